"""LoRA through PEFT, injected into the model in place (module names stay ours), equal to PEFT's
LoRA on the HF projections.

sftplug keeps q/k/v fused in ``qkv`` and gate/up in ``gate_up``. A LoRA on n of a fused
layer's projections is one PEFT LoRA of rank n·r on the fused layer: A stacks the n
projections' A (each r rows, initialized as PEFT initializes a layer of its own), and B is
block-diagonal (projection i's output rows see only its r columns; rows of projections not
targeted are zero). A hook on B's gradient keeps the off-diagonal blocks at zero (AdamW leaves
a zero entry with zero gradient at zero), and the scaling is alpha/r (rslora: alpha/sqrt(r)) of
one projection. So forward, gradients and updates are those of n separate PEFT LoRAs; a PEFT
adapter splits into the blocks and back exactly (sftplug.hf.peft_adapter). DoRA's magnitude is
one value per output row, so it splits by rows. With dropout each projection draws its own mask,
as PEFT's separate layers do.

Each plain LoRA linear layer is computed as one matmul with the merged weight W + s·B·A where
that is exact (sftplug.model.merged_lora). Which projections can be targeted, and their rows in
the fused layers: sftplug.model.lora_targets. A mixture's experts are no linear layers: their
LoRA is PEFT's target_parameters LoRA (sftplug.model.experts_lora).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from sftplug.dtypes import dtype_name
from sftplug.errors import SftplugError
from sftplug.model.experts_lora import add_experts_lora, experts_lora_count, experts_targets_for, train_routers
from sftplug.model.lora_targets import (
    DEFAULT_LORA_TARGETS,
    EXPERTS_TARGETS,
    LORA_VARIANTS,
    STORED_FUSED,
    hf_targets,
    layer_parts,
    lora_layout,
    targeted,
)
from sftplug.model.merged_lora import use_merged_forward
from sftplug.model.quantize import bitsandbytes_dequantizes_exactly, is_quantized

LAYOUT = "per-projection"  # recorded with a checkpoint's LoRA settings; earlier runs shared one A over qkv


@dataclass(frozen=True)
class LoraSpec:
    """What defines a LoRA: rank, alpha, dropout, HF target names, variant, rank-stabilized scale."""

    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    variant: str = "lora"
    rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def settings(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets),
                "variant": self.variant, "rslora": self.rslora, "layout": LAYOUT}


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float, targets, variant: str = "lora",
               rslora: bool = False) -> nn.Module:
    """Inject PEFT LoRA equal to PEFT's on the HF projections ``targets`` (see the module docstring)."""
    from peft import LoraConfig, inject_adapter_in_model

    if variant not in LORA_VARIANTS:
        raise SftplugError(f"--lora-variant must be one of {', '.join(LORA_VARIANTS)}, got {variant!r}")
    default = hf_targets(targets) == hf_targets(DEFAULT_LORA_TARGETS)
    targets = experts_targets_for(model, hf_targets(targets), float(dropout), variant)
    spec = LoraSpec(int(r), float(alpha), float(dropout), targets, variant, bool(rslora))
    layout = lora_layout(model.config)
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    plan = {layer: tuple(p for p in parts if targeted(p[0], spec.targets)) for layer, parts in layout.items()}
    plan = {layer: parts for layer, parts in plan.items() if parts and layer in present}
    available = [part for layer, parts in layout.items() if layer in present for part, _, _ in parts]
    spec = _present_targets(spec, plan, default, available)
    experts = [f"mlp.{t}" for t in spec.targets if t.startswith("experts.")]  # PEFT's target_parameters
    if not plan and not experts:
        raise SftplugError(f"--lora-targets {','.join(spec.targets)}: this model has none of them")
    stacked = {layer: len(parts) for layer, parts in plan.items() if len(parts) > 1}
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=sorted(plan), bias="none",
        use_dora=variant == "dora", use_rslora=spec.rslora,
        rank_pattern={layer: n * spec.r for layer, n in stacked.items()},
        # the scaling of one projection: alpha/r (rslora alpha/sqrt(r)) at rank n·r
        alpha_pattern={layer: spec.alpha * (math.sqrt(n) if spec.rslora else n) for layer, n in stacked.items()},
    )  # fmt: skip
    if variant == "dora":
        _check_dora_base(model, plan)
    if plan:
        model = inject_adapter_in_model(config, model)
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            parts = layer_parts(layout, name.rsplit(".", 1)[-1], module.out_features)
            _prepare_layer(module, tuple(p for p in parts if targeted(p[0], spec.targets)), spec)
    add_experts_lora(model, spec.r, spec.scaling, spec.targets)  # after PEFT, which freezes all but its own
    config.target_parameters = experts or None  # recorded only: PEFT would wrap sftplug's own experts
    model.lora_config, model.lora_spec = config, spec
    use_merged_forward(model)
    return model


def _present_targets(spec: LoraSpec, plan: dict, default: bool, available: list[str]) -> LoraSpec:
    """The spec with the targets the model has: the default names every family's projections and keeps
    this model's; a projection named that the model lacks is refused in one line."""
    covered = {m for parts in plan.values() for part, _, _ in parts for m in STORED_FUSED.get(part, (part,))}
    absent = [t for t in spec.targets if t not in EXPERTS_TARGETS and t not in covered]
    if not absent:
        return spec
    if not default:
        raise SftplugError(f"--lora-targets {','.join(absent)}: this model has no such linear layer; its "
                           f"projections: {','.join(available)}")
    return dataclasses.replace(spec, targets=tuple(t for t in spec.targets if t not in absent))


def _check_dora_base(model: nn.Module, layers) -> None:
    """PEFT's DoRA takes the row norms of the base weight as bitsandbytes dequantizes it; refuse a 4-bit
    layer where that is wrong (bitsandbytes' CPU kernel, rows that are not whole 64-weight blocks)."""
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name.rsplit(".", 1)[-1] in layers and is_quantized(weight) and not bitsandbytes_dequantizes_exactly(weight):
            raise SftplugError(f"--lora-variant dora: bitsandbytes dequantizes the 4-bit {name}.weight "
                               f"({module.out_features}x{module.in_features}) wrongly on {weight.device.type}, and "
                               "PEFT's DoRA norm uses it; leave it out of --lora-targets, use --lora-variant lora, "
                               "or drop --quantize")


def _prepare_layer(layer, parts, spec: LoraSpec) -> None:
    """Adapters in fp32, A initialized per projection, B (and DoRA's magnitude) held block-diagonal."""
    r = spec.r
    layer.lora_parts = tuple(parts)  # (HF projection, first row, end row) of each r-row block of A
    layer.lora_A.float()  # PEFT gives adapters the base's dtype; they train in fp32
    layer.lora_B.float()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        for i in range(len(parts)):  # as PEFT's reset_lora_parameters on a layer of its own (fan-in: in_features)
            nn.init.kaiming_uniform_(a[i * r:(i + 1) * r], a=math.sqrt(5))
    layer.scaling["default"] = spec.scaling  # exactly PEFT's alpha/r, not (n·alpha)/(n·r)
    off = torch.ones(b.shape, dtype=torch.bool, device=b.device)
    for i, (_, start, end) in enumerate(parts):
        off[start:end, i * r:(i + 1) * r] = False
    if off.any():
        b.register_hook(functools.partial(_zero_where, off))
    if spec.variant == "dora":
        layer.lora_magnitude_vector.float()
        rows_off = off.all(dim=1)  # rows of projections not targeted: no DoRA there
        if rows_off.any():
            layer.lora_magnitude_vector["default"].weight.register_hook(functools.partial(_zero_where, rows_off))


def _zero_where(off: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad.masked_fill(off.to(grad.device), 0)


def lora_layers(model: nn.Module):
    """(name, layer) of every LoRA layer sftplug injected."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_parts")]


def lora_param_counts(model: nn.Module) -> tuple[int, int]:
    """Trainable adapter values as PEFT counts them on the HF projections, and as stored (fused)."""
    spec: LoraSpec = model.lora_spec
    as_peft = stored = 0
    for _, layer in lora_layers(model):
        a = layer.lora_A["default"].weight
        for _, start, end in layer.lora_parts:
            rows = end - start
            as_peft += spec.r * a.shape[1] + rows * spec.r + (rows if spec.variant == "dora" else 0)
        stored += sum(p.numel() for n, p in layer.named_parameters() if ".default" in n and "lora_" in n)
    experts = experts_lora_count(model)  # stored as PEFT stores them
    return as_peft + experts, stored + experts


def describe_lora(model: nn.Module) -> str:
    """The run header's LoRA part: what is trained, counted as PEFT counts it, and what is stored."""
    spec: LoraSpec = model.lora_spec
    as_peft, stored = lora_param_counts(model)
    kind = "DoRA" if spec.variant == "dora" else "LoRA"
    scale = f"alpha {spec.alpha:g}" + (", rslora" if spec.rslora else "")
    fused = sorted({name.rsplit(".", 1)[-1] for name, layer in lora_layers(model) if len(layer.lora_parts) > 1})
    text = f"{kind} r={spec.r} ({scale}) on {','.join(spec.targets)}, {as_peft:,} trainable params as PEFT counts them"
    if fused:
        text += f" (stored as {stored:,}: A stacked per projection, B block-diagonal in {'/'.join(fused)})"
    if getattr(model, "trained_routers", False):
        routers = sum(p.numel() for n, p in model.named_parameters() if ".router." in n and p.requires_grad)
        text += f"; the routers trained in full ({routers:,} params)"
    if fused and spec.dropout and spec.variant == "dora":
        text += f"; DoRA dropout: one mask shared by the projections of {'/'.join(fused)} (PEFT draws one each)"
    return text


def lora_settings(model: nn.Module) -> dict | None:
    """The LoRA's settings as a checkpoint records them; on a 4-bit base also the dtype it was
    quantized from (the checkpoint's loader quantizes the base again exactly so)."""
    spec = getattr(model, "lora_spec", None)
    if spec is None:
        return None
    settings = spec.settings()
    if getattr(model, "trained_routers", False):
        settings["train_router"] = True
    quantized = getattr(model, "quantized_base", None)
    if quantized is not None:
        settings["base_dtype"] = dtype_name(quantized.dtype)
    return settings


def shared_a_layout(settings: dict) -> bool:
    """Whether checkpoint LoRA settings are an earlier run's: one A shared by a fused layer's projections."""
    return settings.get("layout") != LAYOUT and bool({"qkv", "gate_up"} & set(settings["targets"]))


def apply_lora_settings(model: nn.Module, settings: dict) -> nn.Module:
    """:func:`apply_lora` with a checkpoint's recorded settings (and its routers trained, if they were)."""
    model = apply_lora(model, settings["r"], settings["alpha"], settings["dropout"], settings["targets"],
                       settings.get("variant", "lora"), settings.get("rslora", False))
    if settings.get("train_router"):
        train_routers(model)
    return model


def upgrade_shared_a(model: nn.Module, weights: dict) -> dict:
    """An earlier run's adapter weights (one A of r rows shared by q/k/v, B over all rows) in the
    per-projection layout: each projection's A is a copy of it and its B block the rows it had; exact."""
    weights = dict(weights)
    for name, layer in lora_layers(model):
        a_key, b_key = f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"
        n, a = len(layer.lora_parts), weights.get(a_key)
        if n < 2 or a is None or a.shape[0] * n != layer.lora_A["default"].weight.shape[0]:
            continue
        r, b = a.shape[0], weights[b_key]
        blocks = torch.zeros(b.shape[0], n * r, dtype=b.dtype)
        for i, (_, start, end) in enumerate(layer.lora_parts):
            blocks[start:end, i * r:(i + 1) * r] = b[start:end]
        weights[a_key], weights[b_key] = a.repeat(n, 1), blocks
    return weights


def trainable_state_dict(model: nn.Module) -> dict:
    """The weights a checkpoint must keep: the adapter for LoRA, else every parameter."""
    if getattr(model, "lora_config", None) is not None:
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    weights = {n: t.detach() for n, t in model.state_dict().items()}
    if model.config.tie_embeddings:  # one tensor under two names; safetensors keeps it once
        weights.pop("lm_head.weight", None)
    return weights


def lm_head_weight(model: nn.Module):
    """The LM head's effective weight, a LoRA on the head (PEFT) included."""
    head = model.lm_head
    if not hasattr(head, "lora_A"):
        return head.weight
    weight = head.base_layer.weight
    for name in head.active_adapters:
        if name in head.lora_A:
            weight = weight + (head.lora_B[name].weight @ head.lora_A[name].weight) * head.scaling[name]
    return weight
