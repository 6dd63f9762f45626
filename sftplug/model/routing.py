"""What the MoE layers' routing says after a forward: the load-balancing loss and each expert's load.

Each MoE layer keeps its last forward's :class:`sftplug.model.experts.Routing` (router logits
and chosen experts). Both functions here count real tokens only: ``real`` [N] marks the rows of
the flattened batch that hold documents, so padding never counts (as transformers' attention
mask excludes it).
"""

from __future__ import annotations

import torch

from sftplug.model.experts import MoE, Routing


def routings(model: torch.nn.Module) -> list[Routing]:
    """Each MoE layer's routing of the last forward, in layer order."""
    return [m.routing for m in model.modules() if isinstance(m, MoE) and m.routing is not None]


def load_balancing_loss(layers: list[Routing], n_experts: int, real: torch.Tensor) -> torch.Tensor:
    """transformers' load-balancing loss over the layers: E · Σ_e f_e · P_e, where f_e is the share of
    the (token, slot) choices that picked expert e and P_e its mean router probability, both over
    every layer's real tokens together (fp32)."""
    weight = real.reshape(-1).float()
    chosen = torch.zeros(n_experts, device=weight.device)
    probability = torch.zeros(n_experts, device=weight.device)
    for routing in layers:
        top_k = routing.experts.shape[1]
        chosen = chosen.scatter_add(0, routing.experts.reshape(-1), weight.repeat_interleave(top_k))
        probability = probability + (routing.logits.float().softmax(-1) * weight[:, None]).sum(0)
    rows = weight.sum() * len(layers)
    return n_experts * ((chosen / rows) * (probability / rows)).sum()


def expert_loads(layers: list[Routing], n_experts: int, real: torch.Tensor) -> torch.Tensor:
    """Tokens each expert received in each layer, real tokens only: [layers, E] fp32, no gradient."""
    weight = real.reshape(-1).float()
    loads = torch.zeros(len(layers), n_experts, device=weight.device)
    for i, routing in enumerate(layers):
        top_k = routing.experts.shape[1]
        loads[i].scatter_add_(0, routing.experts.detach().reshape(-1), weight.repeat_interleave(top_k))
    return loads


def load_extremes(loads: torch.Tensor) -> tuple[float, float]:
    """(the busiest expert's load, the idlest's), each relative to its layer's mean load, over all layers."""
    relative = loads / loads.mean(dim=1, keepdim=True).clamp_min(1e-12)
    return float(relative.max()), float(relative.min())
