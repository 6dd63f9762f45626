"""PEFT adapter folders: adapter_config.json + adapter_model.safetensors with HF module names,
read into sftplug's LoRA (``train --adapter``) and written from it (``export --adapter``).

sftplug's LoRA on a fused layer stacks one PEFT LoRA per targeted projection
(sftplug.model.lora): projection i's lora_A is rows [i·r, (i+1)·r) of the stacked A, its
lora_B the diagonal block of B (its output rows, those r columns), its DoRA magnitude its
rows. :func:`adapter_views` is that map, one view per PEFT tensor name; reading an adapter
copies into the views, writing one copies them out. A LoRA on a mixture's experts is PEFT's
``target_parameters`` LoRA, under its names and in its layout (sftplug.model.experts_lora).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from sftplug.errors import SftplugError
from sftplug.hf.names import hf_pieces
from sftplug.model.experts_lora import (
    hf_experts_module,
    peft_experts_keys,
    peft_experts_tensors,
    peft_factors,
    set_peft_factors,
)
from sftplug.model.lora import apply_lora, lora_layers
from sftplug.model.lora_targets import EXPERTS_TARGETS, LORA_TARGETS, lora_layout

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# adapter_config.json keys sftplug reads or that do not change the model; any other key must keep its default
_ADAPTER_KEYS = {"r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora", "peft_type",
                 "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
                 "auto_mapping", "init_lora_weights", "loftq_config", "eva_config", "corda_config",
                 "lora_ga_config", "megatron_core", "target_parameters"}
_PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
_EXPERTS = re.compile(r"\.experts(\.base_layer)*\.lora_[AB]\.weight$")  # PEFT's ParamWrapper on the experts


def peft_modules(model: nn.Module) -> dict[str, tuple[str, str]]:
    """HF module name of every projection a LoRA can target in ``model`` (with LoRA or without)
    -> (sftplug layer, HF projection)."""
    layout, pieces = lora_layout(model.config), hf_pieces(model.config)
    names = {}
    for name, module in model.named_modules():
        layer = name.rsplit(".", 1)[-1]
        if layer not in layout or not isinstance(getattr(module, "base_layer", module), nn.Linear):
            continue
        hf = [h.removesuffix(".weight") for h, _, _ in pieces.get(f"{name}.weight", [("lm_head.weight", 0, 0)])]
        by_part = {h.rsplit(".", 1)[-1]: h for h in hf}  # lm_head, even when tied
        names.update({by_part[part]: (name, part) for part, _, _ in layout[layer] if part in by_part})
    return names


def adapter_views(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT tensor name -> the view of ``model``'s LoRA that holds it: per targeted HF projection
    its r rows of A, its block of B (and its rows of DoRA's magnitude)."""
    layers, r = dict(lora_layers(model)), model.lora_spec.r
    views = {}
    for hf, (name, part) in peft_modules(model).items():
        blocks = [p for p, _, _ in layers[name].lora_parts] if name in layers else []
        if part not in blocks:
            continue
        layer, i = layers[name], blocks.index(part)
        _, start, end = layer.lora_parts[i]
        cols = slice(i * r, (i + 1) * r)
        views[f"base_model.model.{hf}.lora_A.weight"] = layer.lora_A["default"].weight[cols]  # [r, in]
        views[f"base_model.model.{hf}.lora_B.weight"] = layer.lora_B["default"].weight[start:end, cols]  # [rows, r]
        if model.lora_spec.variant == "dora":
            magnitude = layer.lora_magnitude_vector["default"].weight
            views[f"base_model.model.{hf}.lora_magnitude_vector"] = magnitude[start:end]  # [rows]
    return views


def peft_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter as PEFT saves it: per HF projection its A rows, its B block (and DoRA magnitude rows)."""
    r = model.lora_spec.r
    for name, layer in lora_layers(model):
        b, outside = layer.lora_B["default"].weight.detach(), 0
        for i, (_, start, end) in enumerate(layer.lora_parts):
            outside -= int(b[start:end, i * r:(i + 1) * r].count_nonzero())
        if outside + int(b.count_nonzero()):
            raise SftplugError(f"{name}.lora_B has values outside its diagonal blocks; it is no PEFT adapter")
    return {key: view.detach() for key, view in adapter_views(model).items()} | peft_experts_tensors(model)


def write_peft_adapter(folder: Path, model: nn.Module, base_path: Path) -> None:
    """adapter_config.json + adapter_model.safetensors as PEFT saves them, with HF module names."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    if getattr(model, "trained_routers", False):
        raise SftplugError("cannot export a PEFT adapter: this run trained the routers in full (--train-router), "
                           "which a LoRA adapter does not hold; export it merged (without --adapter)")
    spec = model.lora_spec
    tensors = peft_tensors(model)
    modules = {key.removeprefix("base_model.model.").split(".lora_")[0] for key in set(tensors) - set(
        peft_experts_keys(model))}
    # PEFT reads gate_proj/up_proj/down_proj of a transformers 4 MoE as its experts (v5's gate_up_proj at rank
    # 2r, down_proj): on a model with experts the linear layers are named in full, which it leaves as they are
    targets = sorted(modules if model.config.has_experts else {m.rsplit(".", 1)[-1] for m in modules})
    folder.mkdir(parents=True)
    save_file({k: t.float().contiguous().clone() for k, t in tensors.items()}, str(folder / ADAPTER_WEIGHTS))
    LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        use_rslora=spec.rslora,
        use_dora=spec.variant == "dora",
        target_modules=targets or None,
        target_parameters=[hf_experts_module(model.config, p) for p in model.lora_config.target_parameters or ()]
        or None,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base_path),
    ).save_pretrained(str(folder))
    # PEFT keeps target_modules as a set and writes it in string-hash order, which changes with
    # every process: sorted, the same run exports the same bytes
    config_path = folder / ADAPTER_CONFIG
    saved = json.loads(config_path.read_text())
    saved["target_modules"] = sorted(saved["target_modules"] or []) or None
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True))


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
                               "(it takes r, lora_alpha, lora_dropout, target_modules, target_parameters, "
                               "use_rslora and use_dora)")
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
    experts_targets = _experts_targets(config, Path(folder))
    known = {hf: part for hf, (_, part) in peft_modules(model).items()}  # which HF module names this model has
    modules = {_PEFT_KEY.match(key).group(1) for key in tensors}
    unknown = sorted(k for k in tensors if _PEFT_KEY.match(k).group(1) not in known and not _EXPERTS.search(k))
    if unknown:
        raise SftplugError(f"{weights_path}: tensor '{unknown[0]}' belongs to no linear layer of the model "
                           f"(targets: {', '.join(LORA_TARGETS)})")
    targets = sorted({known[hf] for hf in modules if hf in known}) + experts_targets
    variant = "dora" if config.get("use_dora") else "lora"
    model = apply_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), targets, variant,
                       bool(config.get("use_rslora")))
    expected, r = adapter_views(model), config["r"]
    experts = peft_experts_keys(model)
    shapes = {key: tuple(view.shape) for key, view in expected.items()}
    shapes.update({key: tuple(peft_factors(lora)[which].shape) for key, (lora, which) in experts.items()})
    for key in sorted(set(shapes) | set(tensors)):
        if key not in tensors:
            raise SftplugError(f"{weights_path}: no tensor '{key}'; sftplug's LoRA targets a projection in "
                               "every layer or in none")
        if key not in shapes:
            raise SftplugError(f"{weights_path}: tensor '{key}' does not match the adapter's config "
                               f"(use_dora={config.get('use_dora', False)}, "
                               f"target_parameters={config.get('target_parameters')})")
        if tuple(tensors[key].shape) != shapes[key]:
            raise SftplugError(f"{weights_path}: tensor '{key}' has shape {list(tensors[key].shape)}, expected "
                               f"{list(shapes[key])} (r={r} on this base)")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])
    for key, (lora, which) in experts.items():
        if which == 0:  # lora_A; its lora_B beside it
            set_peft_factors(lora, tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")])
    model.adapter_source = str(folder)
    return model


def _experts_targets(config: dict, folder: Path) -> list[str]:
    """The experts' projections the adapter's ``target_parameters`` names, as --lora-targets names them."""
    targets = []
    for name in config.get("target_parameters") or []:
        parts = str(name).split(".")  # mlp.experts.down_proj, or down_proj as PEFT's v4 conversion writes it
        target = f"experts.{parts[-1]}"
        if target not in EXPERTS_TARGETS or parts[-2:-1] not in ([], ["experts"]):
            raise SftplugError(f"{folder / ADAPTER_CONFIG}: 'target_parameters' names {name!r}; sftplug's LoRA on "
                               f"parameters takes a mixture's {' and '.join(EXPERTS_TARGETS)}")
        targets.append(target)
    return targets
