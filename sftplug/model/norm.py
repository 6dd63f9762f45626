"""RMSNorm, in Llama's form or Gemma's (1 + w) form; its computation is a fused op (sftplug.fused)."""

from __future__ import annotations

import torch
import torch.nn as nn

from sftplug.fused import pytorch
from sftplug.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gemma: bool = False):
        super().__init__()
        self.eps, self.gemma = eps, gemma
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))  # Gemma's scales by 1 + w
        self.op = pytorch.rmsnorm  # or a fused form (Transformer.set_fused_ops)

    def forward(self, x):
        return self.op(x, self.weight, self.eps, self.gemma)


def rms_norm_of(config: ModelConfig, dim: int | None = None) -> RMSNorm:
    return RMSNorm(dim or config.hidden_size, config.norm.eps, config.norm.gemma)
