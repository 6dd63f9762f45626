"""LoRA through PEFT, injected into the model in place (module names stay ours), equal to PEFT's
LoRA on the HF projections.

sftplug keeps q/k/v fused in ``qkv`` and gate/up in ``gate_up``. A LoRA on n of a fused
layer's projections is one PEFT LoRA of rank n·r on the fused layer: A stacks the n
projections' A (each r rows, initialised as PEFT initialises a layer of its own), and B is
block-diagonal (projection i's output rows see only its r columns; rows of projections not
targeted are zero). A hook on B's gradient keeps the off-diagonal blocks at zero (AdamW leaves
a zero entry with zero gradient at zero), and the scaling is alpha/r (rslora: alpha/sqrt(r)) of
one projection. So forward, gradients and updates are those of n separate PEFT LoRAs; a PEFT
adapter splits into the blocks and back exactly (:func:`load_peft_adapter`,
sftplug.checkpoint.export). DoRA's magnitude is one value per output row, so it splits by rows.
With dropout each projection draws its own mask, as PEFT's separate layers do.

Each plain LoRA linear layer is computed as one matmul with the merged weight W + s·B·A.
PEFT computes ``x W^T + s (x A^T) B^T``: besides the base matmul, two skinny matmuls and a
full-size add in forward, three skinny matmuls and another add in backward. With the
frozen W this equals ``x (W + s B A)^T``, and the input gradient ``dy (W + s B A)``
includes the LoRA path for free, so only the gradients of A and B need skinny matmuls. The
merged weight is built again in backward rather than kept (it is as large as W).

Used when it is exact: one plain LoRA adapter, no dropout (or eval), not merged, frozen
base; anything else goes through PEFT's own forward (with dropout, per projection).
"""

from __future__ import annotations

import functools
import json
import math
import re
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from sftplug.dtypes import dtype_name
from sftplug.errors import SftplugError
from sftplug.hf.names import LORA_TARGETS, hf_pieces, hf_targets, lora_layout, targeted
from sftplug.model.quantize import bitsandbytes_dequantizes_exactly, dense_weight, is_quantized

VARIANTS = ("lora", "dora")
LAYOUT = "per-projection"  # recorded with a checkpoint's LoRA settings; earlier runs shared one A over qkv
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraSpec:
    """What defines a LoRA: rank, alpha, dropout, HF target names, variant, rank-stabilised scale."""

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

    if variant not in VARIANTS:
        raise SftplugError(f"--lora-variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    spec = LoraSpec(int(r), float(alpha), float(dropout), hf_targets(targets), variant, bool(rslora))
    layout = lora_layout(model.config)
    plan = {layer: tuple(p for p in parts if targeted(p[0], spec.targets)) for layer, parts in layout.items()}
    plan = {layer: parts for layer, parts in plan.items() if parts}
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
    model = inject_adapter_in_model(config, model)
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            _prepare_layer(module, plan[name.rsplit(".", 1)[-1]], spec)
    model.lora_config, model.lora_spec = config, spec
    use_merged_forward(model)
    return model


def _check_dora_base(model: nn.Module, layers) -> None:
    """PEFT's DoRA takes the row norms of the base weight as bitsandbytes dequantises it; refuse a 4-bit
    layer where that is wrong (bitsandbytes' CPU kernel, rows that are not whole 64-weight blocks)."""
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name.rsplit(".", 1)[-1] in layers and is_quantized(weight) and not bitsandbytes_dequantizes_exactly(weight):
            raise SftplugError(f"--lora-variant dora: bitsandbytes dequantises the 4-bit {name}.weight "
                               f"({module.out_features}x{module.in_features}) wrongly on {weight.device.type}, and "
                               "PEFT's DoRA norm uses it; leave it out of --lora-targets, use --lora-variant lora, "
                               "or drop --quantize")


def _prepare_layer(layer, parts, spec: LoraSpec) -> None:
    """Adapters in fp32, A initialised per projection, B (and DoRA's magnitude) held block-diagonal."""
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
    return as_peft, stored


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
    if fused and spec.dropout and spec.variant == "dora":
        text += f"; DoRA dropout: one mask shared by the projections of {'/'.join(fused)} (PEFT draws one each)"
    return text


def lora_settings(model: nn.Module) -> dict | None:
    """The LoRA's settings as a checkpoint records them; on a 4-bit base also the dtype it was
    quantised from (the checkpoint's loader quantises the base again exactly so)."""
    spec = getattr(model, "lora_spec", None)
    if spec is None:
        return None
    settings = spec.settings()
    quantized = getattr(model, "quantized_base", None)
    if quantized is not None:
        settings["base_dtype"] = dtype_name(quantized.dtype)
    return settings


def shared_a_layout(settings: dict) -> bool:
    """Whether checkpoint LoRA settings are an earlier run's: one A shared by a fused layer's projections."""
    return settings.get("layout") != LAYOUT and bool({"qkv", "gate_up"} & set(settings["targets"]))


def apply_lora_settings(model: nn.Module, settings: dict) -> nn.Module:
    """:func:`apply_lora` with a checkpoint's recorded settings."""
    return apply_lora(model, settings["r"], settings["alpha"], settings["dropout"], settings["targets"],
                      settings.get("variant", "lora"), settings.get("rslora", False))


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


# -- PEFT adapters ----------------------------------------------------------------------


def peft_module_names(model: nn.Module) -> dict[str, tuple[str, int]]:
    """HF module name of each targeted projection -> (sftplug LoRA layer, its block index)."""
    pieces = hf_pieces(model.config)
    names = {}
    for name, layer in lora_layers(model):
        hf = {h.removesuffix(".weight").rsplit(".", 1)[-1]: h.removesuffix(".weight")
              for h, _, _ in pieces.get(f"{name}.weight", [("lm_head.weight", 0, 0)])}  # lm_head, even when tied
        for i, (part, _, _) in enumerate(layer.lora_parts):
            names[hf[part]] = (name, i)
    return names


def peft_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter as PEFT saves it: per HF projection its A rows, its B block (and DoRA magnitude rows)."""
    layers = dict(lora_layers(model))
    r, tensors = model.lora_spec.r, {}
    for name, layer in layers.items():
        b, outside = layer.lora_B["default"].weight.detach(), 0
        for i, (_, start, end) in enumerate(layer.lora_parts):
            outside -= int(b[start:end, i * r:(i + 1) * r].count_nonzero())
        if outside + int(b.count_nonzero()):
            raise SftplugError(f"{name}.lora_B has values outside its diagonal blocks; it is no PEFT adapter")
    for hf, (name, i) in peft_module_names(model).items():
        layer = layers[name]
        _, start, end = layer.lora_parts[i]
        cols = slice(i * r, (i + 1) * r)
        tensors[f"base_model.model.{hf}.lora_A.weight"] = layer.lora_A["default"].weight.detach()[cols]
        tensors[f"base_model.model.{hf}.lora_B.weight"] = layer.lora_B["default"].weight.detach()[start:end, cols]
        if model.lora_spec.variant == "dora":
            magnitude = layer.lora_magnitude_vector["default"].weight.detach()
            tensors[f"base_model.model.{hf}.lora_magnitude_vector"] = magnitude[start:end]
    return tensors


# adapter_config.json keys sftplug reads or that do not change the model; any other key must keep its default
_ADAPTER_KEYS = {"r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora", "peft_type",
                 "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
                 "auto_mapping", "init_lora_weights", "loftq_config", "eva_config", "corda_config",
                 "lora_ga_config", "megatron_core"}
_PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")


def read_peft_adapter(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the tensors of a PEFT LoRA adapter folder, or one line naming what sftplug
    cannot represent."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise SftplugError(f"--adapter {folder}: no {path.name}; a PEFT adapter folder has "
                               f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise SftplugError(f"--adapter {folder}: cannot be read ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise SftplugError(f"{config_path}: 'peft_type' is {config.get('peft_type')!r}; sftplug continues "
                           "LORA adapters")
    defaults = LoraConfig().to_dict()
    empty = (None, False, {}, [], "")
    for key, value in config.items():
        default = defaults.get(key)
        if key not in _ADAPTER_KEYS and value != default and not (value in empty and default in empty):
            raise SftplugError(f"{config_path}: '{key}' is {value!r}; sftplug's LoRA cannot represent it "
                               "(it takes r, lora_alpha, lora_dropout, target_modules, use_rslora and use_dora)")
    r = config.get("r")
    if not isinstance(r, int) or r < 1 or not isinstance(config.get("lora_alpha"), (int, float)):
        raise SftplugError(f"{config_path}: 'r' and 'lora_alpha' must be a positive integer and a number")
    for key in tensors:
        if not _PEFT_KEY.match(key):
            raise SftplugError(f"{weights_path}: tensor '{key}' is not a LoRA A, B or DoRA magnitude of a "
                               "linear layer; sftplug's LoRA cannot represent it")
    return config, tensors


def load_peft_adapter(model: nn.Module, folder) -> nn.Module:
    """Inject LoRA into ``model`` (its base) as the PEFT adapter in ``folder`` defines it, and fill it."""
    config, tensors = read_peft_adapter(folder)
    weights_path = Path(folder) / ADAPTER_WEIGHTS
    by_module = {m.group(1): m.group(2) for m in map(_PEFT_KEY.match, tensors)}
    known = {}
    for name, parts in lora_layout(model.config).items():  # which HF module names this model has
        for hf in peft_module_names_of(model, name, parts):
            known[hf] = hf.rsplit(".", 1)[-1]
    unknown = sorted(k for k in tensors if _PEFT_KEY.match(k).group(1) not in known)
    if unknown:
        raise SftplugError(f"{weights_path}: tensor '{unknown[0]}' belongs to no linear layer of the model "
                           f"(targets: {', '.join(LORA_TARGETS)})")
    targets = sorted({known[hf] for hf in by_module})
    variant = "dora" if config.get("use_dora") else "lora"
    model = apply_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), targets, variant,
                       bool(config.get("use_rslora")))
    layers, r = dict(lora_layers(model)), config["r"]
    expected = {}
    for hf, (name, i) in peft_module_names(model).items():
        layer = layers[name]
        _, start, end = layer.lora_parts[i]
        cols = slice(i * r, (i + 1) * r)
        expected[f"base_model.model.{hf}.lora_A.weight"] = layer.lora_A["default"].weight[cols]
        expected[f"base_model.model.{hf}.lora_B.weight"] = layer.lora_B["default"].weight[start:end, cols]
        if variant == "dora":
            expected[f"base_model.model.{hf}.lora_magnitude_vector"] = (
                layer.lora_magnitude_vector["default"].weight[start:end])
    for key in sorted(set(expected) | set(tensors)):
        if key not in tensors:
            raise SftplugError(f"{weights_path}: no tensor '{key}'; sftplug's LoRA targets a projection in "
                               "every layer or in none")
        if key not in expected:
            raise SftplugError(f"{weights_path}: tensor '{key}' does not match the adapter's config "
                               f"(use_dora={config.get('use_dora', False)})")
        if tuple(tensors[key].shape) != tuple(expected[key].shape):
            raise SftplugError(f"{weights_path}: tensor '{key}' has shape {list(tensors[key].shape)}, expected "
                               f"{list(expected[key].shape)} (r={r} on this base)")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])
    model.adapter_source = str(folder)
    return model


def peft_module_names_of(model: nn.Module, layer: str, parts) -> list[str]:
    """HF module names of ``parts`` of every sftplug layer named ``layer`` (``qkv``, ``lm_head``)."""
    pieces = hf_pieces(model.config)
    names = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == layer and isinstance(module, nn.Linear):
            hf = [h for h, _, _ in pieces.get(f"{name}.weight", [("lm_head.weight", 0, 0)])]
            names += [h.removesuffix(".weight") for h in hf if h.removesuffix(".weight").rsplit(".", 1)[-1] in
                      {p for p, _, _ in parts}]
    return names


# -- the merged forward ---------------------------------------------------------------


class MergedLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, dtype: torch.dtype, state=None):
        with torch.autocast(x.device.type, enabled=False):  # the caller chose the compute dtype
            x = x.to(dtype)
            u = x @ lora_a.to(dtype).t()  # [..., r], kept for the gradient of B
            bias = None if bias is None else bias.to(dtype)
            y = F.linear(x, merged_weight(weight, lora_a, lora_b, scale, dtype, state), bias)
        ctx.save_for_backward(x, u, lora_a, lora_b)
        ctx.weight, ctx.scale, ctx.dtype = weight, scale, dtype  # the frozen (maybe 4-bit) weight itself, not saved
        ctx.state = state
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, lora_a, lora_b = ctx.saved_tensors
        weight, scale, dtype = ctx.weight, ctx.scale, ctx.dtype
        dy = dy.to(dtype)
        dx = dy @ merged_weight(weight, lora_a, lora_b, scale, dtype, ctx.state) if ctx.needs_input_grad[0] else None
        dy2, x2, u2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), u.reshape(-1, u.shape[-1])
        grad_b = (dy2.t() @ u2).mul_(scale).to(lora_b.dtype)  # [out, r]
        grad_a = ((dy2 @ lora_b.to(dtype)).t() @ x2).mul_(scale).to(lora_a.dtype)  # [r, in]
        return dx, None, None, grad_a, grad_b, None, None, None


def merged_weight(weight, lora_a, lora_b, scale: float, dtype: torch.dtype, state=None) -> torch.Tensor:
    """W + scale·B·A in the compute dtype: one addmm (products accumulated in fp32, one rounding),
    so a bf16 run makes no weight-sized fp32 temporaries. A 4-bit W (QLoRA) is dequantised here,
    in forward and again in backward (``state``: its QuantState, when FSDP holds it as plain bytes)."""
    return torch.addmm(dense_weight(weight, dtype, state), lora_b.to(dtype), lora_a.to(dtype), alpha=scale)


def use_merged_forward(model: nn.Module) -> None:
    """Route every PEFT LoRA linear of ``model`` through MergedLoRALinear where it is exact."""
    for module in model.modules():
        if hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), nn.Linear):
            module.forward = types.MethodType(_forward, module)


def _forward(self, x, *args, **kwargs):
    adapter = _single_plain_adapter(self)
    if adapter is None or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own
    if self.training and not isinstance(self.lora_dropout[adapter], nn.Identity):
        return _forward_with_dropout(self, x, adapter)
    base = self.base_layer
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    return MergedLoRALinear.apply(x, base.weight, base.bias, a, b, float(self.scaling[adapter]), dtype,
                                  getattr(base, "quant_state", None))


def _forward_with_dropout(self, x, adapter: str):
    """PEFT's LoRA forward with one dropout mask per projection, drawn in HF's order (q, k, v), as
    PEFT's separate layers draw them."""
    result = self.base_layer(x)
    a, b, dropout = self.lora_A[adapter].weight, self.lora_B[adapter], self.lora_dropout[adapter]
    x = self._cast_input_dtype(x, a.dtype)
    parts = getattr(self, "lora_parts", (None,))
    r = a.shape[0] // len(parts)
    u = torch.cat([F.linear(dropout(x), a[i * r:(i + 1) * r]) for i in range(len(parts))], dim=-1)
    return (result + b(u) * self.scaling[adapter]).to(result.dtype)


def _single_plain_adapter(layer) -> str | None:
    """The one active vanilla LoRA adapter of a frozen, unmerged base layer, else None."""
    if layer.disable_adapters or layer.merged or layer.base_layer.weight.requires_grad:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    return active[0]
