"""Attention: the contract plugins implement (sftplug.attention.backend) and the choice of a
backend for a run (sftplug.attention.choice)."""

from sftplug.attention.backend import AttentionBackend, AttentionRequest
from sftplug.offers import Priority

__all__ = ["AttentionBackend", "AttentionRequest", "Priority"]
