"""sftplug: a plugin-based supervised fine-tuning trainer for Llama-family models."""

__version__ = "0.1.0"

import logging  # noqa: E402

# bitsandbytes (imported by sftplug or by PEFT) logs at import that an optional hub kernel
# package is absent; its CPU backend works without it, so that line would only alarm users.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from sftplug.hookspecs import hookimpl  # noqa: E402

__all__ = ["__version__", "hookimpl", "load_model"]


def load_model(path, *, dtype=None, device="cpu"):
    """Load a model (preset name, HF folder or sftplug checkpoint); see sftplug.loading."""
    from sftplug.loading import load_model as _load_model

    return _load_model(path, dtype=dtype, device=device).model
