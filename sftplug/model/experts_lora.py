"""LoRA on a mixture's experts exactly as PEFT's ``target_parameters`` trains it.

PEFT wraps the experts module in one ParamWrapper per targeted 3-D parameter, holding lora_A
[E·r, in] (expert e's A is rows [e·r, (e+1)·r)) and lora_B [out, r·E] (column k·E + e is expert
e's B[:, k]), scaled by alpha/r (rslora alpha/sqrt(r)); ``in`` is the projection's input features
whether the family stores it [E, out, in] or, as gpt-oss, [E, in, out]. sftplug keeps the same
values as :class:`~sftplug.model.experts.ExpertsLoRA` A [E, r, in] and B [E, out, r], applied by
the experts' grouped products without forming W + sBA. PEFT refuses dropout (x cannot be factored
out of ``lora_B(lora_A(dropout(x)))`` there) and DoRA on such a parameter; so does sftplug.

The wrappers nest in the order of the module's parameters, gate_up_proj innermost: with both
projections targeted PEFT saves gate_up_proj's adapter under ``mlp.experts.base_layer.lora_A.weight``
and down_proj's under ``mlp.experts.lora_A.weight``; one alone is ``mlp.experts.lora_A.weight``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sftplug.errors import SftplugError
from sftplug.model.experts import PROJECTIONS, Experts, ExpertsLoRA, MoE
from sftplug.model.lora_targets import DEFAULT_LORA_TARGETS, EXPERTS_TARGETS, hf_targets


def experts_layers(model: nn.Module) -> list[tuple[str, Experts]]:
    """(name, module) of every MoE layer's routed experts."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Experts)]


def experts_projections(targets) -> tuple[str, ...]:
    """The experts' projections among HF ``targets``, in the order PEFT nests their wrappers."""
    return tuple(p for p in PROJECTIONS if f"experts.{p}" in targets)


def experts_targets_for(model: nn.Module, targets: tuple[str, ...], dropout: float, variant: str) -> tuple[str, ...]:
    """``targets`` as ``model`` takes them: the default's experts dropped on a dense model; naming
    them there, or with dropout or DoRA, refused in one line."""
    named = [t for t in targets if t in EXPERTS_TARGETS]
    if not named:
        return targets
    if not experts_layers(model):
        if targets == hf_targets(DEFAULT_LORA_TARGETS):  # the default covers experts where there are some
            return tuple(t for t in targets if t not in EXPERTS_TARGETS)
        raise SftplugError(f"--lora-targets {','.join(named)}: this model has no experts (no layer is a mixture of "
                           "experts); leave them out")
    if dropout:
        raise SftplugError(f"--lora-dropout {dropout:g}: PEFT's LoRA on the experts (target_parameters) cannot apply "
                           f"dropout and refuses it; use --lora-dropout 0 or leave {','.join(named)} out of "
                           "--lora-targets")
    if variant == "dora":
        raise SftplugError(f"--lora-variant dora: PEFT's LoRA on the experts (target_parameters) has no DoRA and "
                           f"refuses it; use --lora-variant lora or leave {','.join(named)} out of --lora-targets")
    return targets


def add_experts_lora(model: nn.Module, r: int, scaling: float, targets) -> None:
    """An ExpertsLoRA (trainable, fp32, initialized as PEFT initializes its lora_A) on each targeted
    projection of every MoE layer; the experts' weights and the router stay frozen."""
    projections = experts_projections(targets)
    for _, experts in experts_layers(model):
        shapes = Experts.shapes(model.config)
        for projection in projections:
            out, inp = shapes[projection]
            lora = ExpertsLoRA(experts.count, r, inp, out, scaling)
            experts.lora[projection] = lora.to(getattr(experts, projection).device)


def experts_loras(model: nn.Module) -> list[tuple[str, str, ExpertsLoRA]]:
    """(experts module name, projection, its LoRA) of every experts' LoRA, in PEFT's nesting order."""
    return [(name, p, experts.lora[p]) for name, experts in experts_layers(model) for p in PROJECTIONS
            if p in experts.lora]


def experts_lora_count(model: nn.Module) -> int:
    """The experts' adapter values, as PEFT counts them (its lora_A and lora_B hold the same numbers)."""
    return sum(lora.A.numel() + lora.B.numel() for _, _, lora in experts_loras(model))


def experts_lora_names(model: nn.Module) -> set[str]:
    """State-dict names of the experts' adapters (``layers.0.mlp.experts.lora.down_proj.A``)."""
    return {f"{name}.lora.{p}.{factor}" for name, p, _ in experts_loras(model) for factor in ("A", "B")}


# -- PEFT's names and layout ---------------------------------------------------------


def peft_factors(lora: ExpertsLoRA) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A [E·r, in], lora_B [out, r·E]) as PEFT stores them."""
    experts, r, inp = lora.A.shape
    return lora.A.reshape(experts * r, inp), lora.B.permute(1, 2, 0).reshape(lora.B.shape[1], r * experts)


def set_peft_factors(lora: ExpertsLoRA, a: torch.Tensor, b: torch.Tensor) -> None:
    """Fill ``lora`` from PEFT's lora_A [E·r, in] and lora_B [out, r·E]."""
    experts, r, inp = lora.A.shape
    with torch.no_grad():
        lora.A.copy_(a.reshape(experts, r, inp))
        lora.B.copy_(b.reshape(lora.B.shape[1], r, experts).permute(2, 0, 1))


def peft_experts_keys(model: nn.Module) -> dict[str, tuple[ExpertsLoRA, int]]:
    """PEFT tensor name -> (the LoRA it belongs to, 0 for lora_A or 1 for lora_B)."""
    keys = {}
    for name, projection, lora in experts_loras(model):
        nested = [p for p in PROJECTIONS if p in model.get_submodule(name).lora]
        outer = len(nested) - 1 - nested.index(projection)  # wrappers around this one
        module = f"base_model.model.model.{hf_experts_module(model.config, name)}" + ".base_layer" * outer
        keys[f"{module}.lora_A.weight"] = (lora, 0)
        keys[f"{module}.lora_B.weight"] = (lora, 1)
    return keys


def hf_experts_module(config, name: str) -> str:
    """An experts module's (or its parameter's) name in transformers: Gemma 4's sit on the decoder layer
    beside its MLP (sftplug keeps them in the layer's feed-forward, sftplug.model.gemma4_moe)."""
    return name.replace("mlp.experts", "experts") if config.architecture == "gemma4_text" else name


def peft_experts_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The experts' adapters under PEFT's names, in its layout."""
    return {key: peft_factors(lora)[which].detach() for key, (lora, which) in peft_experts_keys(model).items()}


def merged_experts_weight(experts: Experts, projection: str, weight: torch.Tensor) -> torch.Tensor:
    """The stored weight with W_e + s·B_e·A_e merged in, in fp32, in the stored layout ([E, in, out]
    where the family stores it so)."""
    a, b, scaling = experts.lora[projection].factors()
    delta = torch.bmm(b.float(), a.float()) * scaling  # [E, out, in]
    return weight.float() + (delta.transpose(1, 2) if experts.options.transposed else delta)


def train_routers(model: nn.Module) -> int:
    """``--train-router``: every MoE layer's router trained in full beside the LoRA (its weight, and its
    bias where it has one; GLM-4.5's correction bias is a buffer, not trained); the parameters it trains."""
    routers = [m.router for m in model.modules() if isinstance(m, MoE)]
    if not routers:
        raise SftplugError("--train-router: this model has no mixture of experts, so no router to train")
    for router in routers:
        router.requires_grad_(True)
        router.float()  # trained in fp32, as the adapters are
    model.trained_routers = True
    return sum(p.numel() for r in routers for p in r.parameters())
