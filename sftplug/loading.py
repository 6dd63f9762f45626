"""Load a model through the load_state hook, its attention chosen in the same pass.

Presets, HF folders and sftplug checkpoints are built-in loaders (plugins); the first one
that knows the source returns a :class:`LoadedModel` without attention, and
:func:`load_model` gives every block the backend asked for.
"""

from __future__ import annotations

import torch

from sftplug.attention.choice import attach
from sftplug.errors import SftplugError
from sftplug.model.contract import LoadedModel

__all__ = ["LoadedModel", "load_model"]


def load_model(source: str, *, dtype=None, device="cpu", registry=None, attention: str | None = "auto",
               quantize=None) -> LoadedModel:
    """The model and tokenizer ``source`` names, loaded by the first plugin that knows it.

    :param dtype: the weights' dtype, or None for the source's own.
    :param attention: the backend for every block: "auto" (the fastest for the weights'
        dtype on ``device``) or a name; None leaves it unset for a caller that chooses
        later (a training run knows whether its rows are packed only after tokenizing).
    :param quantize: a :class:`sftplug.model.quantize.QuantSpec` to keep the base's block
        weights in 4-bit (QLoRA), or None. A loader that does not quantize while it reads (presets,
        third-party loaders) returns dense weights; they are quantized here, layer by layer.
    """
    from sftplug.registry import build_registry

    registry = registry or build_registry()
    device = torch.device(device) if isinstance(device, str) else device

    def load_base(inner_source: str, quantize=None) -> LoadedModel:  # for formats built on another model
        return load_model(inner_source, dtype=dtype, device=device, registry=registry, attention=None,
                          quantize=quantize)

    loaded = registry.hook.load_state(source=str(source), dtype=dtype, device=device, load_base=load_base,
                                      quantize=quantize, load_model=load_base)  # load_model: its old name
    if loaded is None:
        raise SftplugError(f"{source}: not a built-in preset, an HF checkpoint folder or an sftplug checkpoint")
    if quantize is not None and not loaded.info.get("quantized"):  # a loader that returned dense weights
        quantize_dense(loaded, quantize)
    if attention is not None:
        dtype = next(loaded.model.parameters()).dtype
        loaded.attention = attach(loaded.model, registry, attention, device, dtype)
    return loaded


def quantize_dense(loaded: LoadedModel, spec) -> None:
    from sftplug.model.quantize import describe_quantized, quantize_model, quantized_info

    quantize_model(loaded.model, spec)
    loaded.info["quantized"] = quantized_info(loaded.model)
    loaded.description += f"; {describe_quantized(loaded.info['quantized'])}"
