"""A mixture of experts as a block's feed-forward: a router picks each token's experts, the
experts compute over the tokens grouped by expert, and a shared expert may run beside them.

The experts are stacked as transformers 5 keeps them: one 3-D parameter per projection,
``gate_up_proj`` and ``down_proj`` [experts, out, in] ([experts, in, out] where the family
stores them so, gpt-oss). They are computed dropless (every token reaches its k experts) by the
``grouped_linear`` op over the tokens sorted by expert: no Python loop over experts. A LoRA on
them is PEFT's ``target_parameters`` LoRA, one A [r, in] and one B [out, r] per expert, applied
as its factors inside the op. Each family's routing (sftplug.model.config.ExpertsConfig.router)
is computed as transformers computes it; the last forward's routing stays on the module for
the load-balancing loss and the router statistics (sftplug.model.routing).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from sftplug.fused import pytorch
from sftplug.fused.grouped import Groups, grouped_linear
from sftplug.fused.op import OpSet
from sftplug.model.config import ModelConfig
from sftplug.model.feed_forward import MLP

PROJECTIONS = ("gate_up_proj", "down_proj")  # the experts' parameters, as transformers names them


class Routing(NamedTuple):
    """One MoE layer's routing of a forward's tokens: the router's logits [N, E] and the chosen experts [N, k]."""

    logits: torch.Tensor
    experts: torch.Tensor


class Router(nn.Module):
    """Each token's k experts and their weights, as the family computes them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.options = config.experts
        n = self.options.count
        self.weight = nn.Parameter(torch.empty(n, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(n)) if self.options.router_bias else None
        if self.options.router == "sigmoid_groups":  # GLM-4.5's learned balance, a buffer it saves
            self.register_buffer("e_score_correction_bias", torch.zeros(n, dtype=torch.float32))

    def forward(self, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, C] -> (logits [N, E], weights [N, k], experts [N, k])."""
        o = self.options
        if o.router == "sigmoid_groups":  # in fp32, as GLM-4.5 computes it
            logits = F.linear(x.float(), self.weight.float())
            return (logits, *self._sigmoid_groups(logits))
        logits = F.linear(x, self.weight, self.bias)
        if o.router == "logits":  # gpt-oss: the top k logits, then their softmax
            top, experts = torch.topk(logits, o.top_k, dim=-1)
            return logits, top.softmax(dim=1, dtype=top.dtype), experts
        top, experts = torch.topk(logits.softmax(-1, dtype=torch.float32), o.top_k, dim=-1)
        if o.norm_top_k:
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), experts

    def _sigmoid_groups(self, logits):
        o = self.options
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias
        per_group = choice.view(-1, o.groups, o.count // o.groups)
        group_scores = per_group.topk(2, dim=-1).values.sum(-1)  # each group by its two best experts
        best_groups = group_scores.topk(o.top_groups, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        choice = choice.masked_fill(~keep.repeat_interleave(o.count // o.groups, dim=1), float("-inf"))
        experts = choice.topk(o.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, experts)
        if o.norm_top_k:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * o.scale, experts


class ExpertsLoRA(nn.Module):
    """PEFT's LoRA on one stacked projection: A [E, r, in] and B [E, out, r] per expert, scaled by ``scaling``."""

    def __init__(self, n_experts: int, r: int, in_features: int, out_features: int, scaling: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(n_experts, r, in_features, dtype=torch.float32))
        self.B = nn.Parameter(torch.zeros(n_experts, out_features, r, dtype=torch.float32))
        self.scaling = scaling
        with torch.no_grad():  # as PEFT initializes its [E·r, in] lora_A (fan-in: in)
            nn.init.kaiming_uniform_(self.A.view(-1, in_features), a=math.sqrt(5))

    def factors(self):
        return self.A, self.B, self.scaling


class Experts(nn.Module):
    """The routed experts: ``gate_up_proj`` and ``down_proj`` stacked, biases where the family has them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        o = self.options = config.experts
        self.count = o.count
        for name, (out, inp) in self.shapes(config).items():
            shape = (o.count, inp, out) if o.transposed else (o.count, out, inp)
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
            self.register_parameter(f"{name}_bias", nn.Parameter(torch.zeros(o.count, out)) if o.bias else None)
        self.lora = nn.ModuleDict()  # projection -> its ExpertsLoRA, when one is targeted (sftplug.model.lora)
        self.grouped_linear = grouped_linear  # or fused forms (set_fused_ops)
        self.glu = pytorch.glu

    @staticmethod
    def shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
        """Each projection's (out, in) features."""
        i = config.experts.intermediate_size
        return {"gate_up_proj": (2 * i, config.hidden_size), "down_proj": (config.hidden_size, i)}

    def weight(self, name: str):
        """The projection as [E, out, in], a view of how it is stored."""
        w = getattr(self, name)
        return w.transpose(1, 2) if self.options.transposed else w

    def project(self, name: str, x, groups: Groups):
        lora = self.lora[name].factors() if name in self.lora else None
        return self.grouped_linear(x, groups, self.weight(name), getattr(self, f"{name}_bias"), lora)

    def forward(self, x, weights, experts):
        """x [N, C], each token's experts [N, k] and their weights [N, k] -> the weighted sum of its experts."""
        n, k = experts.shape
        flat = experts.flatten()
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
        groups = Groups.of(flat[order], self.count)
        h = self.project("gate_up_proj", x[order // k], groups)
        y = self.project("down_proj", self.activate(h), groups)
        slots = torch.empty_like(order)
        slots[order] = torch.arange(len(order), device=order.device)
        y = y[slots].view(n, k, -1) * weights[..., None].to(y.dtype)  # back in token order: a sum without atomics
        return y.sum(1).to(x.dtype)

    def activate(self, h):
        o = self.options
        if o.activation == "clamped_swiglu":  # gpt-oss: gate and up interleaved, clamped
            gate = h[..., ::2].clamp(max=o.swiglu_limit)
            up = h[..., 1::2].clamp(min=-o.swiglu_limit, max=o.swiglu_limit)
            return (up + 1) * (gate * torch.sigmoid(gate * o.swiglu_alpha))
        return self.glu(h, o.activation)


class MoE(nn.Module):
    """The feed-forward kind "experts": router, routed experts, and the shared expert where the family has one."""

    router_class = Router  # a family's own router (Gemma 4's) is a subclass

    def __init__(self, config: ModelConfig):
        super().__init__()
        o = config.experts
        self.router = self.router_class(config)
        self.experts = Experts(config)
        self.shared = MLP(config, o.shared_size) if o.shared_size else None
        self.shared_gate = nn.Linear(config.hidden_size, 1, bias=False) if o.shared_gate else None
        self.routing: Routing | None = None  # the last forward's

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, weights, experts = self.router(flat)
        self.routing = Routing(logits, experts)
        y = self.experts(flat, weights, experts)
        if self.shared is not None:
            shared = self.shared(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            y = y + shared
        return y.view(shape)

    def set_fused_ops(self, ops: OpSet) -> None:
        self.experts.grouped_linear = ops.grouped_linear
        self.experts.glu = ops.glu
        if self.shared is not None:
            self.shared.set_fused_ops(ops)
