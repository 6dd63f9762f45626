"""Load a model through the load_state hook: presets, HF folders, sftplug checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sftplug.errors import SftplugError


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object  # sftplug.data.tokenizer.Tokenizer
    source: str
    description: str = ""
    info: dict = field(default_factory=dict)  # format-specific facts (base source, lora, step)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SftplugError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SftplugError(f"--device {name}: no CUDA GPU is visible to this torch build; use --device cpu")
    return device


def load_model(source: str, *, dtype=None, device="cpu", registry=None) -> LoadedModel:
    """The model and tokenizer ``source`` names, loaded by the first plugin that knows it."""
    from sftplug.registry import build_registry

    registry = registry or build_registry()
    device = torch.device(device) if isinstance(device, str) else device

    def load_nested(inner_source: str) -> LoadedModel:
        return load_model(inner_source, dtype=dtype, device=device, registry=registry)

    loaded = registry.hook.load_state(source=str(source), dtype=dtype, device=device, load_model=load_nested)
    if loaded is None:
        raise SftplugError(
            f"{source}: not a built-in preset, an HF checkpoint folder or an sftplug checkpoint"
        )
    if loaded.model.layers[0].attn.backend is None:  # callable as loaded; a training run picks its own
        dtype = next(loaded.model.parameters()).dtype
        loaded.info["attention"] = set_default_attention(loaded.model, device, dtype, registry)
    return loaded


def set_default_attention(model, device, dtype: torch.dtype, registry=None) -> str:
    """Give every block the backend ``--attention auto`` picks for this device and dtype; returns why."""
    from sftplug.attention import attach
    from sftplug.registry import build_registry

    return attach(model, registry or build_registry(), "auto", device, dtype).reason
