"""Loading an HF checkpoint folder: Llama 2/3/3.1, Mistral, Qwen2.

A folder with config.json and safetensors weights (model.safetensors, or shards with
model.safetensors.index.json) plus tokenizer.json. The model is built on the meta device,
given empty storage in the target dtype, and filled tensor by tensor straight from the
files: q/k/v and gate/up rows land directly in the fused ``qkv`` / ``gate_up`` parameters,
so the model is never held twice. Every tensor is accounted for: a missing, unexpected or
wrongly shaped one is an SftplugError naming it.

With a :class:`~sftplug.model.quantize.QuantSpec` (QLoRA) the full-precision model is never
held at all: the block linears' weights stay on the meta device, each is read into a dense
buffer of its own (qkv from its q, k and v tensors, whichever files they are in), quantized
as soon as its last rows are read, and the buffer dropped. Tensors are read layer by layer, so
at most one layer's buffers are alive at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from sftplug.data.tokenizer import Tokenizer
from sftplug.dtypes import as_dtype, dtype_name
from sftplug.errors import SftplugError
from sftplug.hf.config import config_from_hf
from sftplug.hf.language_model import LANGUAGE_MODEL_OF, language_model_name
from sftplug.hf.mxfp4 import dequantized_weights
from sftplug.hf.names import IGNORABLE, hf_layout, map_names_to_model, mismatch_error, rows_of
from sftplug.hf.weights import WeightFiles, open_weights, read_into
from sftplug.model.contract import LoadedModel
from sftplug.model.quantize import (
    QuantSpec,
    block_linear_names,
    check_quantizable,
    describe_quantized,
    mark_quantized,
    numel,
    quantize_linear,
    quantized_info,
    set_submodule,
)
from sftplug.model.transformer import ModelConfig, Transformer

CONFIG = "config.json"


def read_hf_config(folder: Path) -> ModelConfig:
    path = folder / CONFIG
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SftplugError(f"{path}: cannot be read as JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise SftplugError(f"{path}: not a JSON object")
    return config_from_hf(hf, str(path))


def source_dtype(config: ModelConfig) -> torch.dtype:
    """The dtype config.json declares (``dtype`` or ``torch_dtype``), float32 if none."""
    name = config.extra.get("dtype") or config.extra.get("torch_dtype") or "float32"
    try:
        return as_dtype(name)
    except SftplugError:
        return torch.float32


def load_hf_folder(folder, dtype=None, device="cpu", quantize: QuantSpec | None = None) -> LoadedModel:
    """Model and tokenizer of an HF checkpoint folder, without attention (the caller chooses it);
    with ``quantize``, its block linears in 4-bit, quantized while they are read."""
    folder = Path(folder)
    device = torch.device(device)
    config = read_hf_config(folder)
    if quantize is not None:
        check_quantizable(config, quantize.kind, str(folder))
    weights = open_weights(folder)  # validates every file before anything is allocated
    # MXFP4 experts (gpt-oss) are read dense: the loaded model, and so its export, is not quantized
    weights = dequantized_weights(weights, config.extra.pop("quantization_config", None))
    tower = []
    if config.extra.get("language_model_of"):  # a folder with towers: its language model's tensors alone
        weights, tower = language_model_weights(weights)
    tokenizer = Tokenizer(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise SftplugError(
            f"{folder}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json vocab_size is "
            f"{config.vocab_size}; the tokenizer does not belong to these weights"
        )
    dtype = as_dtype(dtype) or source_dtype(config)
    model = empty_model(config, dtype, device, quantized=quantize is not None)
    ignored = load_hf_weights(model, weights, quantize)
    model.eval()
    info = {"format": "hf", "model_type": config.architecture, "files": [p.name for p in weights.files]}
    notes = []
    if quantize:
        info["quantized"] = quantized_info(model)
        notes.append(describe_quantized(info["quantized"]))
    if ignored:
        info["ignored"] = ignored
        notes.append(f"ignored {len(ignored)} derived tensor(s) such as {ignored[0]}")
    if tower:
        towers = LANGUAGE_MODEL_OF[config.extra["language_model_of"]]
        notes.append(f"the language model of a {config.extra['language_model_of']} folder: its {towers} "
                     f"({len(tower)} tensors such as {tower[0]}) {'are' if towers.endswith('s') else 'is'} left out, "
                     "and exports hold the language model")
    window = config.extra.get("sliding_window")
    if window and (config.architecture == "mistral" or config.extra.get("use_sliding_window")):
        notes.append(f"sliding_window {window} not applied: exact for sequences up to {window} tokens")
    params = sum(numel(p) for p in model.parameters())
    description = (
        f"HF {config.architecture} checkpoint {folder} ({params / 1e6:.1f}M params, {dtype_name(dtype)}, "
        f"{len(weights.files)} file{'s' * (len(weights.files) > 1)})" + "".join(f"; {n}" for n in notes)
    )
    return LoadedModel(model, tokenizer, str(folder), description, info)


def empty_model(config: ModelConfig, dtype: torch.dtype, device: torch.device, quantized: bool = False) -> Transformer:
    """The model with uninitialized storage: built on the meta device, then given memory once.

    :param quantized: leave the block linears' weights on meta (the loader quantizes each from a
        buffer of its own); their biases get storage.
    """
    with torch.device("meta"):
        model = Transformer(config)
    model.to(dtype=dtype)  # free on meta
    left_out = set(block_linear_names(model)) if quantized else set()
    for name, module in model.named_modules():
        if name not in left_out:
            module.to_empty(device=device, recurse=False)
        elif module.bias is not None:
            module.bias = nn.Parameter(torch.empty_like(module.bias, device=device), requires_grad=False)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_rope(device)  # non-persistent buffers, kept in fp32
    return model


def load_hf_weights(model: torch.nn.Module, weights: WeightFiles, quantize: QuantSpec | None = None) -> list[str]:
    """Fill ``model`` (plain or PEFT-wrapped) from HF tensors; returns the ignored derived tensors.

    Every parameter of the base model must be covered: missing, unexpected or wrongly shaped
    tensors raise an SftplugError naming them, before any tensor is read. With ``quantize``, the
    block linears left on meta by :func:`empty_model` are quantized as they are read.
    """
    config = model.config
    plan = hf_layout(config)
    own = model.state_dict(keep_vars=True)
    names = map_names_to_model({ours for ours, _, _ in plan.values()}, model)
    filled = set(names.values())
    embedding = own.get(names["embed_tokens.weight"])  # a tied lm_head is this very parameter
    unfilled = [n for n, t in own.items() if n not in filled and not _is_lora(n) and t is not embedding]
    if unfilled or None in filled:  # the model and hf_layout disagree: never leave a tensor uninitialized
        raise SftplugError(f"sftplug cannot load HF weights into {unfilled or sorted(names)}: no HF name for them")
    ignored, unexpected, wrong = [], {}, []
    for key, entry in weights.entries.items():
        if key not in plan:
            if IGNORABLE.search(key) or (key == "lm_head.weight" and config.tie_embeddings):
                ignored.append(key)  # derived from config.json, or tied to the embedding
            else:
                unexpected[key] = entry.file.name
            continue
        ours, start, end = plan[key]
        want = (end - start, *rows_of(own[names[ours]]).shape[1:])
        if _rows_shape(entry.shape) != want:
            wrong.append((key, entry.file.name, entry.shape, want))
        elif not entry.dtype.is_floating_point:
            raise SftplugError(f"{entry.file}: tensor '{key}' has dtype {entry.dtype}; weights must be floating point")
    missing = [k for k in plan if k not in weights.entries]
    if unexpected or missing or wrong:
        raise mismatch_error(
            str(weights.folder), unexpected, missing, wrong, plan, weights.where, _layer_note(missing, plan, config)
        )
    if quantize:
        read_quantizing(model, weights, plan, {ours: own[name] for ours, name in names.items()}, quantize)
        return sorted(ignored)
    for path, entries in weights.by_file().items():
        with open(path, "rb", buffering=0) as handle:
            for entry in entries:
                if entry.key in plan:
                    ours, start, end = plan[entry.key]
                    read_into(entry, rows_of(own[names[ours]].data)[start:end], handle)
    return sorted(ignored)


def language_model_weights(weights: WeightFiles) -> tuple[WeightFiles, list[str]]:
    """The language model's tensors renamed as it stores them alone (sftplug.hf.language_model); and the
    names of the rest (the towers'), which are left out."""
    kept, left_out = {}, []
    for key, entry in weights.entries.items():
        name = language_model_name(key)
        if name is None:
            left_out.append(key)
        else:
            kept[name] = dataclasses.replace(entry, key=name)
    return dataclasses.replace(weights, entries=kept), sorted(left_out)


def _is_lora(name: str) -> bool:
    return ".lora_" in name or ".lora." in name  # PEFT's layers' adapters, the experts' (sftplug.model.experts)


def _rows_shape(shape: tuple) -> tuple:
    """A stored tensor's shape as rows (an experts' stack of 3 dims has its first two flattened)."""
    return (shape[0] * shape[1], *shape[2:]) if len(shape) == 3 else tuple(shape)


def read_quantizing(model: torch.nn.Module, weights: WeightFiles, plan: dict, targets: dict, spec: QuantSpec) -> None:
    """Read every tensor of ``plan``: into its parameter, or for a block linear's weight (still on
    meta) into a dense buffer that is quantized once its last rows are in, then dropped.

    :param targets: sftplug's parameter name -> the model's tensor (names as in ``plan``).
    """
    layers = {f"{name}.weight": name for name in block_linear_names(model)}
    pending: dict[str, set[str]] = {}  # block linear weight -> the HF tensors still to read into it
    for key, (ours, _, _) in plan.items():
        if ours in layers:
            pending.setdefault(ours, set()).add(key)
    embedding = targets["embed_tokens.weight"]
    dtype, device = spec.dtype or embedding.dtype, embedding.device
    entries = [e for es in weights.by_file().values() for e in es if e.key in plan]
    entries.sort(key=lambda e: _layer_index(e.key))  # stable: in file order within a layer
    buffers: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(open(path, "rb", buffering=0)) for path in weights.files}
        for entry in entries:
            ours, start, end = plan[entry.key]
            if ours not in layers:
                read_into(entry, targets[ours].data[start:end], handles[entry.file])
                continue
            if ours not in buffers:
                buffers[ours] = dense_buffer(targets[ours].shape, dtype, device)
            read_into(entry, buffers[ours][start:end], handles[entry.file])
            pending[ours].discard(entry.key)
            if not pending[ours]:
                name = layers[ours]
                set_submodule(model, name, quantize_linear(model.get_submodule(name), buffers.pop(ours), spec))
    mark_quantized(model, QuantSpec(spec.kind, spec.double_quant, dtype))


def dense_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The temporary full-precision weight of one block linear while it is read."""
    return torch.empty(shape, dtype=dtype, device=device)


def _layer_index(key: str) -> int:
    """The layer an HF tensor belongs to; -1 for the embeddings, final norm and head."""
    match = re.search(r"\.layers\.(\d+)\.", key)
    return int(match.group(1)) if match else -1


def _layer_note(missing: list[str], plan: dict, config: ModelConfig) -> str:
    """Say so when whole layers are missing (config.json promises more layers than the files hold)."""
    per_layer = sum(1 for key in plan if key.startswith("model.layers.0."))
    counts: dict[int, int] = {}
    for key in missing:
        if key.startswith("model.layers."):
            layer = int(key.split(".")[2])
            counts[layer] = counts.get(layer, 0) + 1
    whole = sorted(layer for layer, n in counts.items() if n == per_layer)
    if not whole:
        return ""
    shown = ", ".join(map(str, whole[:5])) + (" ..." if len(whole) > 5 else "")
    return f" (layer {shown} entirely missing; config.json says num_hidden_layers={config.n_layers})"


