"""The linear-attention options of the hybrid families' config.json: Qwen3.5 (``qwen3_5_text``,
``qwen3_5_moe_text``) and Qwen3-Next, whose ``layer_types`` alternate Gated DeltaNet layers
(``linear_attention``) with gated softmax attention (``full_attention``)."""

from __future__ import annotations

from sftplug.errors import SftplugError
from sftplug.model.config import LinearAttentionConfig

HYBRID = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")
# HF layer_types -> sftplug mixer kinds
LAYER_TYPES = {"linear_attention": "linear_attention", "full_attention": "attention"}
# hybrids with token mixers sftplug does not run yet: model_type -> the layer type
UNSUPPORTED_MIXERS = {"nemotron_h": "Mamba-2 layers", "falcon_h1": "Mamba-2 layers",
                      "granitemoehybrid": "Mamba-2 layers", "jamba": "Mamba layers", "lfm2": "short convolution layers",
                      "lfm2_moe": "short convolution layers", "kimi_linear": "Kimi Delta Attention layers"}


def linear_attention_from_hf(model_type: str, hf: dict, where: str) -> tuple[LinearAttentionConfig, tuple[str, ...]]:
    """The Gated DeltaNet options and each layer's mixer; a family without linear attention gets neither."""
    if model_type not in HYBRID:
        return LinearAttentionConfig(), ()
    n_layers = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:  # transformers' default: every fourth layer full attention
        interval = hf.get("full_attention_interval", 4)
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]
    if len(types) != n_layers or not set(types) <= set(LAYER_TYPES):
        raise SftplugError(f"{where}: layer_types must name linear_attention or full_attention for each of the "
                           f"{n_layers} layers")
    try:
        options = LinearAttentionConfig(
            key_heads=hf.get("linear_num_key_heads", 16), value_heads=hf.get("linear_num_value_heads", 32),
            key_head_dim=hf.get("linear_key_head_dim", 128), value_head_dim=hf.get("linear_value_head_dim", 128),
            conv_kernel=hf.get("linear_conv_kernel_dim", 4),
            projections="grouped" if model_type == "qwen3_next" else "split")
    except ValueError as exc:
        raise SftplugError(f"{where}: {exc}") from None
    return options, tuple(LAYER_TYPES[t] for t in types)
