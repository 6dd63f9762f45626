"""Export a model to HF format: a folder transformers loads, or a base folder plus a PEFT adapter.

Output layout (``out_dir`` must not exist or be empty; it is written under a temporary name
and renamed when complete):

* merge=True, or a model without LoRA (full fine-tune, HF folder, preset) ->
  ``out_dir/`` is one HF model folder: config.json, model.safetensors (or
  model-0000i-of-0000n.safetensors + model.safetensors.index.json), tokenizer files,
  generation_config.json when the base had one.
  Load with ``AutoModelForCausalLM.from_pretrained(out_dir)``.
* merge=False with LoRA ->
  ``out_dir/base/``    the HF model folder of the base weights (as above), and
  ``out_dir/adapter/`` adapter_config.json + adapter_model.safetensors with HF module names.
  Load with ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out_dir/"base"), out_dir/"adapter")``.

sftplug fuses q/k/v and gate/up; HF keeps them apart. sftplug's LoRA on the fused ``qkv`` is
PEFT's LoRA on each targeted projection, stacked (sftplug.hf.peft_adapter): projection i's lora_A is
its r rows of the stacked A, its lora_B the diagonal block of B (its output rows, its r
columns), its DoRA magnitude its rows. Merging adds scaling * B @ A to the base weight in fp32
before casting (DoRA: and scales each row by magnitude / its norm, as PEFT merges). A LoRA on a
mixture's experts (PEFT's target_parameters) merges per expert, W_e + scaling * B_e @ A_e, in the
layout the family stores them (transposed for gpt-oss), also in fp32.

A LoRA trained on a 4-bit base (QLoRA, ``--quantize``) is exported on the base it trained on:
the block linears dequantized (quantized again from the base model exactly as the run did),
so the exported base is the nf4- (or fp4-) rounded base, not the original weights. Both
layouts hold it: merged, plus the adapter; as base + adapter, the dequantized base in base/.
Embeddings, norms and the LM head were never quantized and are the original weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from sftplug.checkpoint import folders
from sftplug.data.chat_templates import CONFIG_FILE, TEMPLATE_FILE
from sftplug.dtypes import as_dtype
from sftplug.errors import SftplugError
from sftplug.hf.config import check_exportable, config_to_hf
from sftplug.hf.load import source_dtype
from sftplug.hf.names import map_names_to_model, to_hf_state_dict
from sftplug.hf.peft_adapter import write_peft_adapter
from sftplug.model.experts_lora import experts_lora_names, experts_loras, merged_experts_weight
from sftplug.model.quantize import dequantize_model
from sftplug.model.transformer import ModelConfig, Transformer

DEFAULT_MAX_SHARD_BYTES = 4 * 2**30
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
)  # not the model's chat templates: write_chat_template writes the one the run trained with


def export_checkpoint(
    checkpoint,
    out_dir,
    merge: bool = True,
    *,
    dtype=None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    registry=None,
) -> dict[str, Path]:
    """Write ``checkpoint`` as HF-format folder(s) under ``out_dir``; see the module docstring.

    :param checkpoint: an sftplug checkpoint (run folder, step folder, ``latest``), an HF
        folder or a preset name: anything ``sftplug.loading.load_model`` accepts.
    :param out_dir: the folder to create (must not exist, or be empty).
    :param merge: merge a LoRA into the base weights (True) or write base + adapter (False).
    :param dtype: the dtype of the written weights ("bf16", "fp16", "fp32" or a torch dtype);
        None keeps the base model's own (config.json's dtype, float32 for presets).
    :param max_shard_bytes: largest safetensors file before the weights are sharded.
    :returns: ``{"model": out_dir}``, or ``{"base": out_dir/"base", "adapter": out_dir/"adapter"}``.
    """
    out = Path(out_dir)
    wanted_dtype = as_dtype(dtype)  # a bad dtype fails before anything is loaded
    _refuse_before_loading(checkpoint, out)
    model, tokenizer = _load_in_fp32(checkpoint, registry)
    config: ModelConfig = model.config
    check_exportable(config)
    lora = getattr(model, "lora_config", None)
    out_dtype = wanted_dtype or source_dtype(config)
    as_adapter = lora is not None and not merge
    # HF's names and layout, the LoRA merged in unless it is written beside the base as an adapter.
    plain = plain_weights(model, merge=lora is not None and merge)
    export_config = config
    if config.tie_embeddings and not torch.equal(plain["lm_head.weight"], plain["embed_tokens.weight"]):
        export_config = dataclasses.replace(config, tie_embeddings=False)  # a merged LoRA on lm_head
    hf_weights = to_hf_state_dict(plain, export_config)
    # Written under a temporary name and renamed when complete: no half-written export is ever left at out.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model_dir = tmp / "base" if as_adapter else tmp
    try:
        model_dir.mkdir(parents=True)
        write_hf_model(model_dir, hf_weights, export_config, out_dtype, tokenizer, max_shard_bytes)
        if as_adapter:
            write_peft_adapter(tmp / "adapter", model, base_path=(out / "base").resolve())
        folders.give_normal_modes(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"base": out / "base", "adapter": out / "adapter"} if as_adapter else {"model": out}


def _refuse_before_loading(checkpoint, out: Path) -> None:
    """An output folder in use, or an incomplete or corrupt sftplug checkpoint, refused with a precise message."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SftplugError(f"{out}: already exists and is not an empty folder; choose a new output folder")
    folder = folders.resolve(checkpoint)
    if folder.is_dir() and (folder / folders.MANIFEST).exists():
        manifest = folders.verify(folder)
        if not isinstance(manifest.get("base_model"), str):
            raise SftplugError(f"{folder / folders.MANIFEST}: names no base_model; not a complete sftplug checkpoint")


def _load_in_fp32(checkpoint, registry) -> tuple[torch.nn.Module, object]:
    """The model on the CPU in fp32, a 4-bit base dequantized (the base its adapter trained on), and its tokenizer."""
    from sftplug.loading import load_model

    loaded = load_model(str(checkpoint), dtype=torch.float32, device="cpu", registry=registry, attention=None)
    if getattr(loaded.model, "quantized_base", None) is not None:
        dequantize_model(loaded.model, torch.float32)
    return loaded.model, loaded.tokenizer


def plain_weights(model: torch.nn.Module, merge: bool) -> dict[str, torch.Tensor]:
    """The base weights under plain sftplug names (``qkv.weight``), LoRA merged in if ``merge``."""
    from peft.tuners.lora import LoraLayer

    state = model.state_dict()
    with torch.device("meta"):
        reference = Transformer(model.config)
    mapping = map_names_to_model(state.keys(), reference)
    plain, stray, experts_adapters = {}, [], experts_lora_names(model)
    for key, target in mapping.items():
        if target is not None:
            plain[target] = state[key]
        elif ".lora_" not in key and key not in experts_adapters:
            stray.append(key)
    if stray:
        raise SftplugError(f"cannot export: weights {stray[:3]} belong to no layer of the model")
    if merge:
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, LoraLayer) and "default" in module.lora_A:
                    weight = f"{name}.weight"
                    plain[weight] = merged_lora_weight(module, plain[weight])
            for name, projection, _ in experts_loras(model):
                weight = f"{name}.{projection}"
                plain[weight] = merged_experts_weight(model.get_submodule(name), projection, plain[weight])
    return plain


def merged_lora_weight(layer, weight: torch.Tensor) -> torch.Tensor:
    """The base weight with the layer's LoRA merged in, in fp32 (DoRA as PEFT's merge_safe)."""
    merged = weight.float() + layer.get_delta_weight("default").float()
    if "default" in getattr(layer, "lora_magnitude_vector", {}):
        magnitude = layer.lora_magnitude_vector["default"].weight.float()
        merged = merged * (magnitude / torch.linalg.norm(merged, dim=1)).view(-1, 1)
    return merged


def write_hf_model(folder: Path, weights, config: ModelConfig, dtype, tokenizer, max_shard_bytes: int) -> None:
    from sftplug.hf.weights import save_weights

    save_weights(folder, weights, max_shard_bytes, dtype=dtype)
    hf_config = config_to_hf(config, dtype, tokenizer)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    source = Path(tokenizer.folder)
    if (source / "generation_config.json").is_file():
        shutil.copy(source / "generation_config.json", folder)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder)
    write_chat_template(folder, tokenizer)


def write_chat_template(folder: Path, tokenizer) -> None:
    """The chat template the run trained with, where transformers 5 reads it: chat_template.jinja, its only copy.

    tokenizer_config.json loses its ``chat_template`` and none of the model's other template
    files (chat_template.json, additional_chat_templates/) is carried over, so
    ``apply_chat_template`` renders the trained format whatever it is asked (tools included).
    """
    config_path = folder / CONFIG_FILE
    if config_path.is_file():
        tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
        if tokenizer_config.pop("chat_template", None) is not None:
            config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if tokenizer.chat_template:
        (folder / TEMPLATE_FILE).write_text(tokenizer.chat_template, encoding="utf-8")
