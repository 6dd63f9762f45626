"""What this torch wheel, CUDA and GPU can do: every capability check lives here.

Plugins ask these before they register, so a plugin that cannot run is listed with
its reason instead of failing at import or, worse, silently falling back.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def cuda_version() -> str | None:
    """The CUDA version this wheel was built for (None for a CPU wheel)."""
    return torch.version.cuda


def gpu_capability() -> tuple[int, int] | None:
    if not cuda_available():
        return None
    return torch.cuda.get_device_capability()


def gpu_name() -> str | None:
    return torch.cuda.get_device_name() if cuda_available() else None


def cudnn_version() -> int | None:
    return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None


def module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@functools.cache
def triton_version() -> str | None:
    if not module_available("triton"):
        return None
    import triton

    return triton.__version__


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def flash_built() -> bool:
    """Whether this torch build has the CUDA flash-attention kernel compiled in."""
    return bool(getattr(torch.backends.cuda, "is_flash_attention_available", lambda: False)())


def sdpa_cpu_flash_supported() -> bool:
    """CPU SDPA ships a flash-style kernel since torch 2.2; probe it by running it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 1, 4, 8)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    except RuntimeError:
        return False
    return True


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True
