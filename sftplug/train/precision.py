"""The precision of a run: ``--dtype auto`` resolved, and the policy plugins return
(autocast dtype, loss scaler for fp16 only, TF32)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from sftplug import probes


@dataclass
class PrecisionPolicy:
    name: str  # bf16 | fp16 | fp32
    autocast_dtype: torch.dtype | None
    scaler: "torch.amp.GradScaler | None"  # fp16 only; None means no scaler code runs
    tf32: bool = False

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def resolve_dtype(name: str, device: torch.device) -> tuple[str, str]:
    """``--dtype`` as the name plugins see, and why when it was ``auto``.

    auto: bf16 on a GPU that runs it (tensor cores, and every fused attention kernel),
    else fp32 (the CPU, and GPUs without bf16, where fp16 would need a loss scaler).
    """
    if name != "auto":
        return name, ""
    if device.type == "cuda" and probes.bf16_supported(device):
        return "bf16", "--dtype auto: this GPU runs bf16"
    where = "the CPU" if device.type == "cpu" else f"{device.type} without bf16"
    return "fp32", f"--dtype auto: fp32 on {where}"
