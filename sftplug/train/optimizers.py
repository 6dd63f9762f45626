"""The optimizer of a run: torch's AdamW, or bitsandbytes' 8-bit and paged AdamW (``--optimizer``).

All four take the same hyperparameters (betas 0.9/0.95, eps 1e-8, decoupled weight decay).
adamw8bit keeps both moments in 8 bits with a scale per block of 256 values (bitsandbytes'
blockwise quantization); the paged variants put their state in CUDA unified memory, which
the driver pages out to CPU memory when the GPU runs short, so they need a GPU.
"""

from __future__ import annotations

import torch

from sftplug.errors import SftplugError
from sftplug.probes import import_bitsandbytes

BETAS, EPS = (0.9, 0.95), 1e-8
BITSANDBYTES = {"adamw8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw8bit": "PagedAdamW8bit"}


def make_optimizer(name: str, params: list, lr: float, weight_decay: float, device: torch.device):
    """``--optimizer name`` over ``params``, or one line saying why it cannot run here."""
    bnb = check_optimizer(name, device)
    if bnb is None:
        return torch.optim.AdamW(params, lr=lr, betas=BETAS, weight_decay=weight_decay, eps=EPS)
    return getattr(bnb.optim, BITSANDBYTES[name])(params, lr=lr, betas=BETAS, weight_decay=weight_decay, eps=EPS)


def check_optimizer(name: str, device: torch.device):
    """bitsandbytes for its optimizers (None for torch's AdamW), or one line saying why ``name`` cannot
    run on ``device``; a run asks before it loads anything."""
    if name == "adamw":
        return None
    if name not in BITSANDBYTES:
        raise SftplugError(f"--optimizer {name}: not one of adamw, {', '.join(BITSANDBYTES)}")
    if name.startswith("paged") and device.type != "cuda":
        raise SftplugError(f"--optimizer {name}: paged optimizers page their state between GPU and CPU memory; "
                           f"this run is on {device.type}: use adamw or adamw8bit")
    return import_bitsandbytes(f"--optimizer {name}")

