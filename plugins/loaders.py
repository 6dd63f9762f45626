"""Built-in loaders: the model presets (random init), HF checkpoint folders (sftplug.hf.load) and
sftplug's own checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

from sftplug import hookimpl
from sftplug.checkpoint import folders
from sftplug.config import ASSETS
from sftplug.data.tokenizer import Tokenizer
from sftplug.dtypes import as_dtype
from sftplug.errors import SftplugError
from sftplug.hf.load import CONFIG, load_hf_folder
from sftplug.hf.names import load_state_dict_exact
from sftplug.hf.weights import has_weight_files
from sftplug.model.contract import LoadedModel
from sftplug.model.lora import apply_lora_settings, shared_a_layout, upgrade_shared_a
from sftplug.model.quantize import QuantSpec
from sftplug.model.transformer import PRESETS, ModelConfig, Transformer

BASE_SEED = 1234  # presets are a fixed random init, so every run starts from the same base


class Presets:
    @hookimpl(trylast=True)
    def load_state(self, source, dtype, device):
        if source not in PRESETS:
            return None
        config = ModelConfig.preset(source)
        model = Transformer(config)
        model.init_weights(BASE_SEED)
        model.to(device=device, dtype=dtype or torch.float32)
        model.reset_rope(device)  # .to(bf16) rounded the RoPE frequencies; they stay fp32, as HF keeps them
        params = sum(p.numel() for p in model.parameters())
        return LoadedModel(model, Tokenizer(ASSETS), source, f"built-in preset '{source}' ({params / 1e6:.1f}M params)")


class HFCheckpoint:
    @hookimpl
    def load_state(self, source, dtype, device, quantize):
        folder = Path(source)
        if not folder.is_dir() or (folder / folders.MANIFEST).is_file():
            return None  # not a folder, or an sftplug checkpoint (its own loader)
        if not (folder / CONFIG).is_file():
            if has_weight_files(folder):
                raise SftplugError(f"{folder}: has weights but no {CONFIG}; an HF checkpoint folder needs both")
            return None
        return load_hf_folder(folder, dtype=dtype, device=device, quantize=quantize)  # quantized as it is read


class SftplugCheckpoint:
    @hookimpl
    def load_state(self, source, dtype, device, load_base, quantize):
        if not folders.is_checkpoint(source):
            return None
        folder = folders.resolve(source)
        manifest = folders.verify(folder)
        if "base_model" not in manifest:
            raise SftplugError(f"{folder / folders.MANIFEST}: no base_model; the checkpoint cannot be loaded")
        lora = manifest.get("lora")
        quantized = base_quantization(manifest, folder, quantize) if lora else None  # a full fine-tune: dense
        base = load_base(manifest["base_model"], quantize=quantized)
        model = base.model
        template = manifest.get("config", {}).get("chat_template")
        if template:  # the run trained with this template; answer with it too
            base.tokenizer.set_chat_template(template)
        if lora:
            model = apply_lora_settings(model, lora)
        weights = folders.load_weights(folder)
        if lora and shared_a_layout(lora):  # an earlier run's LoRA: one A over q/k/v, exactly as three
            weights = upgrade_shared_a(model, weights)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad] if lora else None
        load_state_dict_exact(model, weights, str(folder / folders.WEIGHTS), expected=trainable)
        model.eval()
        info = {"base_model": manifest["base_model"], "lora": lora, "step": manifest["step"]}
        description = f"sftplug checkpoint {folder}"
        if base.info.get("quantized"):
            info["quantized"] = base.info["quantized"]
            description += f" (base: {base.description})"
        return LoadedModel(model, base.tokenizer, str(folder), description, info)


def base_quantization(manifest: dict, folder: Path, asked: QuantSpec | None) -> QuantSpec | None:
    """How a LoRA checkpoint's base is quantized: as its run trained it (--quantize, --double-quant
    and the dtype it quantized from), else as ``asked``."""
    config = manifest.get("config", {})
    kind = config.get("quantize", "none")
    if kind == "none":
        return asked
    trained = QuantSpec(kind, config.get("double_quant", True), as_dtype(manifest["lora"].get("base_dtype")))
    if trained.dtype is None:
        raise SftplugError(f"{folder / folders.MANIFEST}: trained on a {kind} base but records no base_dtype; "
                           "the checkpoint is incomplete")
    if asked is not None and (asked.kind, asked.double_quant) != (trained.kind, trained.double_quant):
        raise SftplugError(f"--quantize {asked.kind}: {folder} was trained on a {kind} base "
                           f"(double_quant={trained.double_quant}); use its settings")
    return trained


presets = Presets()
hf_checkpoint = HFCheckpoint()
sftplug_checkpoint = SftplugCheckpoint()
