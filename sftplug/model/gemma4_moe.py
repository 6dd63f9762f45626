"""Gemma 4's feed-forward where ``enable_moe_block``: its MLP and a mixture of experts side by side.

As transformers' Gemma4TextDecoderLayer computes it: the MLP reads the block's normed input and
its output gets a norm of its own; the router and the experts read the residual stream before
that norm (the router through an RMSNorm without a scale, times a learned scale and
hidden**-0.5; softmax in fp32, the top k renormalised, times each chosen expert's learned
scale), the experts' input and output each with a norm of their own; the block norms the sum.
The experts are sftplug's (grouped products, PEFT's target_parameters LoRA); Gemma 4 has no
load-balancing loss (sftplug.train.balance refuses a coefficient for it).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sftplug.fused.op import OpSet
from sftplug.model.config import ModelConfig
from sftplug.model.experts import MoE, Router, Routing
from sftplug.model.feed_forward import MLP
from sftplug.model.norm import rms_norm_of


class Gemma4Router(Router):
    """``weight`` (HF router.proj), ``scale`` [C] on its normed input, ``per_expert_scale`` [E] on the weights."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(self.options.count))
        self.eps, self.input_scale = config.norm.eps, config.hidden_size ** -0.5

    def forward(self, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, C] (the residual stream) -> (logits [N, E], weights [N, k], experts [N, k])."""
        h = x.float()
        h = (h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)).to(x.dtype)  # pow: as HF rounds it
        logits = F.linear(h * self.scale * self.input_scale, self.weight)
        top, experts = torch.topk(logits.softmax(-1, dtype=torch.float32), self.options.top_k, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True)
        return logits, top * self.per_expert_scale[experts], experts


class Gemma4MoE(MoE):
    """norm(mlp(normed)) + norm(experts(norm(x))) as routed from x; the block adds it, normed, to x."""

    router_class = Gemma4Router

    def __init__(self, config: ModelConfig, mlp_size: int):
        super().__init__(config)
        self.dense = MLP(config, mlp_size)
        self.dense_post_norm = rms_norm_of(config)  # HF post_feedforward_layernorm_1
        self.experts_norm = rms_norm_of(config)  # pre_feedforward_layernorm_2
        self.experts_post_norm = rms_norm_of(config)  # post_feedforward_layernorm_2

    def forward(self, normed, x):
        """``normed``: the block's normed input, which the MLP reads; ``x``: the residual stream itself."""
        flat = x.reshape(-1, x.shape[-1])
        logits, weights, experts = self.router(flat)
        self.routing = Routing(logits, experts)
        routed = self.experts(self.experts_norm(flat), weights, experts).view(x.shape)
        return self.dense_post_norm(self.dense(normed)) + self.experts_post_norm(routed)

    def set_fused_ops(self, ops: OpSet) -> None:
        super().set_fused_ops(ops)
        self.dense.set_fused_ops(ops)
