"""The precision policy of a run: autocast dtype, loss scaler (fp16 only), TF32."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


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
