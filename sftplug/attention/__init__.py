from sftplug.attention.choice import *  # noqa: F401,F403
from sftplug.attention.choice import AttentionBackend, AttentionRequest  # noqa: F401
