"""config.json <-> ModelConfig for the HF families sftplug loads (Llama 2/3/3.1, Mistral, Qwen2).

The source's fields are kept in ``ModelConfig.extra`` so an export writes them back.
"""

from __future__ import annotations

import torch

from sftplug.dtypes import hf_dtype_name
from sftplug.errors import SftplugError
from sftplug.model.transformer import ModelConfig

# model_type -> the transformers class that loads it.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """The ModelConfig of an HF config.json (Llama 2/3/3.1, Mistral, Qwen2); the source is kept in ``extra``."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise SftplugError(
            f"{where}: model_type {model_type!r} is not supported; sftplug loads {', '.join(ARCHITECTURES)}"
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int):
            raise SftplugError(f"{where}: {key} is missing or not an integer")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise SftplugError(f"{where}: hidden_act {act!r} is not supported (sftplug's MLP is SwiGLU: silu)")
    if model_type == "llama" and hf.get("attention_bias"):
        raise SftplugError(f"{where}: attention_bias=true (biases on q/k/v/o) is not supported")
    if hf.get("mlp_bias"):
        raise SftplugError(f"{where}: mlp_bias=true is not supported")
    theta, scaling = _rope_from_hf(hf, where)
    n_heads = hf["num_attention_heads"]
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or 0,
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",  # Qwen2: biases on q/k/v, none on o
            architecture=model_type,
            extra=dict(hf),
        )
    except ValueError as exc:
        raise SftplugError(f"{where}: {exc}") from None


def _rope_from_hf(hf: dict, where: str) -> tuple[float, dict | None]:
    params = hf.get("rope_parameters")  # transformers 5: rope_theta lives inside
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:  # transformers 4: rope_theta + rope_scaling
        theta, scaling = hf.get("rope_theta", 10000.0), hf.get("rope_scaling")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise SftplugError(f"{where}: partial_rotary_factor is not supported")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind not in ("llama3", "linear"):
        raise SftplugError(f"{where}: rope type {kind!r} is not supported (supported: default, llama3, linear)")
    return theta, {k: v for k, v in scaling.items() if k != "rope_theta"}


def config_to_hf(config: ModelConfig, dtype: torch.dtype, tokenizer=None) -> dict:
    """The config.json that makes transformers build the same model as ``config``."""
    arch = config.architecture if config.architecture in ARCHITECTURES else "llama"
    if config.qkv_bias != (arch == "qwen2"):
        raise SftplugError(
            f"cannot export a {arch} model with qkv_bias={config.qkv_bias}: "
            "only Qwen2 has q/k/v biases without an o bias"
        )
    hf = {k: v for k, v in config.extra.items() if k not in ("transformers_version", "_name_or_path")}
    hf.update(
        architectures=[ARCHITECTURES[arch]],
        model_type=arch,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=config.tie_embeddings,
        hidden_act="silu",
    )
    if "head_dim" in hf or config.head_dim != config.hidden_size // config.n_heads:
        hf["head_dim"] = config.head_dim
    if arch == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    if "rope_parameters" in hf:  # keep the source's config style (transformers 5)
        hf["rope_parameters"] = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    else:
        hf.update(rope_theta=config.rope_theta, rope_scaling=config.rope_scaling)
    hf["dtype" if "dtype" in hf else "torch_dtype"] = hf_dtype_name(dtype)
    if tokenizer is not None:
        for key, value in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id)):
            if hf.get(key) is None and value is not None:
                hf[key] = value
        if hf.get("pad_token_id") is None and tokenizer.pad_token is not None:
            hf["pad_token_id"] = tokenizer.pad_id
    return dict(sorted(hf.items()))
