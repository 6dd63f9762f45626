"""The gated MLP feed-forward (SwiGLU, GeGLU): fused gate_up, then down. Module names (gate_up,
down) are what LoRA targets; the gated activation is a fused op (sftplug.fused)."""

from __future__ import annotations

import torch.nn as nn

from sftplug.fused import pytorch
from sftplug.fused.op import OpSet
from sftplug.model.config import ModelConfig


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, intermediate_size: int = 0):
        super().__init__()
        inter = intermediate_size or config.intermediate_size  # a shared expert has its own
        self.gate_up = nn.Linear(config.hidden_size, 2 * inter, bias=False)
        self.down = nn.Linear(inter, config.hidden_size, bias=False)
        self.activation = config.feed_forward.activation
        self.glu = pytorch.glu  # or a fused form (set_fused_ops)

    def forward(self, x):
        return self.down(self.glu(self.gate_up(x), self.activation))

    def set_fused_ops(self, ops: OpSet) -> None:
        self.glu = ops.glu
