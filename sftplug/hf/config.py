"""config.json <-> ModelConfig for the HF families sftplug loads: Llama 2/3/3.1, Mistral,
Ministral 3, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text), Phi-3/4, OLMo 2, OLMo 3, SmolLM3,
Granite 3; the MoE families (sftplug.hf.experts_config), the hybrids (sftplug.hf.hybrid_config),
and the language model of folders with towers beside it (sftplug.hf.language_model).

Each family's options become ModelConfig options (in its rotary, norm, attention and
feed-forward groups); a key sftplug cannot run exactly (a MoE, a vision tower, an unknown RoPE
type, biases where the family has none) is refused in one line naming it. The source's fields
are kept in ``ModelConfig.extra`` so an export writes them back.
"""

from __future__ import annotations

import math

import torch

from sftplug.dtypes import hf_dtype_name
from sftplug.errors import SftplugError
from sftplug.hf.experts_config import EXPERT_COUNT_KEYS, experts_from_hf
from sftplug.hf.gemma4_config import gemma4_config
from sftplug.hf.hybrid_config import HYBRID, UNSUPPORTED_MIXERS, linear_attention_from_hf
from sftplug.hf.language_model import LANGUAGE_MODEL_OF, language_model_config
from sftplug.model.config import (
    FULL,
    SLIDING,
    AttentionConfig,
    FeedForwardConfig,
    LayerType,
    ModelConfig,
    NormConfig,
    Rope,
    RotaryConfig,
)

# model_type -> the transformers class that loads it.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "smollm3": "SmolLM3ForCausalLM",
                 "granite": "GraniteForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM",
                 "glm4_moe": "Glm4MoeForCausalLM", "gpt_oss": "GptOssForCausalLM",
                 "olmo3": "Olmo3ForCausalLM", "ministral3": "Ministral3ForCausalLM",
                 "qwen3_5_text": "Qwen3_5ForCausalLM", "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
                 "qwen3_next": "Qwen3NextForCausalLM", "gemma4_text": "Gemma4ForCausalLM"}
GEMMA = ("gemma2", "gemma3_text", "gemma4_text")
# Keys of configurations sftplug cannot run exactly: key -> what it means (experts only in the MoE families).
REFUSED_KEYS = {"num_experts": "a mixture of experts", "num_local_experts": "a mixture of experts",
                "n_routed_experts": "a mixture of experts", "vision_config": "a vision tower",
                "audio_config": "an audio tower", "kv_lora_rank": "multi-head latent attention",
                "clip_qkv": "q, k and v clamped"}
# Families with biases on q, k and v (and where o has one too).
QKV_BIAS = {"qwen2": "always", "qwen2_moe": "qkv_bias", "glm4_moe": "attention_bias", "gpt_oss": "attention_bias"}
O_BIAS = {"gpt_oss": "attention_bias"}
QWEN_WINDOWS = ("qwen2", "qwen3", "smollm3", "qwen3_moe", "qwen2_moe")  # use_sliding_window, max_window_layers
# Families whose sliding-window layers have a RoPE of their own -> its base where the file gives none
SLIDING_THETA = {"gemma3_text": 10000.0, "olmo3": 500000.0}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """The ModelConfig of an HF config.json (Llama 2/3/3.1, Mistral, Qwen2); the source is kept in ``extra``."""
    if hf.get("model_type") in LANGUAGE_MODEL_OF:  # its language model; the vision tower is left out
        hf = language_model_config(hf, where)
    model_type = hf.get("model_type")
    if model_type == "gemma4_text":  # its own options (sftplug.hf.gemma4_config)
        return gemma4_config(hf, where)
    if model_type in UNSUPPORTED_MIXERS:
        raise SftplugError(f"{where}: model_type {model_type!r} has {UNSUPPORTED_MIXERS[model_type]}, which sftplug "
                           "does not run; its hybrids are Qwen3.5 and Qwen3-Next (Gated DeltaNet)")
    if model_type not in ARCHITECTURES:
        raise SftplugError(
            f"{where}: model_type {model_type!r} is not supported; sftplug loads {', '.join(ARCHITECTURES)}"
        )
    for key, what in REFUSED_KEYS.items():
        if hf.get(key) and not (what == "a mixture of experts" and model_type in EXPERT_COUNT_KEYS):
            raise SftplugError(f"{where}: {key} ({what}) is not supported; sftplug cannot run it exactly")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int):
            raise SftplugError(f"{where}: {key} is missing or not an integer")
    act_key = "hidden_activation" if model_type in GEMMA else "hidden_act"
    act = hf.get(act_key) or ("gelu_pytorch_tanh" if model_type in GEMMA else "silu")
    if act not in ACTIVATIONS:
        raise SftplugError(f"{where}: {act_key} {act!r} is not supported (sftplug's gated MLP runs "
                           f"{', '.join(ACTIVATIONS)})")
    if model_type not in QKV_BIAS and hf.get("attention_bias"):
        raise SftplugError(f"{where}: attention_bias=true (biases on q/k/v/o) is not supported")
    if hf.get("mlp_bias"):
        raise SftplugError(f"{where}: mlp_bias=true is not supported")
    theta, scaling = _rope_from_hf(hf, where)
    n_heads = hf["num_attention_heads"]
    try:
        options = _family_options(model_type, hf, where)
        experts, feed_forwards = experts_from_hf(model_type, hf, where)
        linear_attention, mixers = linear_attention_from_hf(model_type, hf, where)
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or 0,
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            architecture=model_type,
            extra=dict(hf),
            rotary=RotaryConfig(theta=float(theta), scaling=scaling, **options.pop("rotary")),
            norm=NormConfig(eps=float(hf.get("rms_norm_eps", 1e-6)), **options.pop("norm")),
            attention=AttentionConfig(qkv_bias=_has_bias(QKV_BIAS, model_type, hf),
                                      o_bias=_has_bias(O_BIAS, model_type, hf), **options.pop("attention")),
            feed_forward=FeedForwardConfig(activation=ACTIVATIONS[act]),
            experts=experts,
            linear_attention=linear_attention,
            layer_types=_layer_types(mixers, feed_forwards, hf["num_hidden_layers"]),
            **options,  # the residual stream's and LM head's scales
        )
    except ValueError as exc:
        raise SftplugError(f"{where}: {exc}") from None


def _layer_types(mixers: tuple[str, ...], feed_forwards: tuple[str, ...], n_layers: int) -> tuple[LayerType, ...]:
    """Each layer's mixer and feed-forward kinds; () where every layer is attention and an MLP."""
    if not (mixers or feed_forwards):
        return ()
    mixers, feed_forwards = mixers or ("attention",) * n_layers, feed_forwards or ("mlp",) * n_layers
    return tuple(LayerType(mixer=m, feed_forward=f) for m, f in zip(mixers, feed_forwards))


def _has_bias(table: dict, model_type: str, hf: dict) -> bool:
    """Whether the family's projections in ``table`` have biases: always, or as a config.json key says."""
    key = table.get(model_type)
    return key == "always" or bool(key and hf.get(key, model_type in ("qwen2_moe", "gpt_oss")))  # their defaults


def _family_options(model_type: str, hf: dict, where: str) -> dict:
    """The ModelConfig options beyond Llama's that this family's config.json asks for: the scales,
    and under "rotary", "norm" and "attention" those groups' options."""
    n_layers, n_heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    rotary, norm, scales = {}, {}, {}
    attention: dict = {"windows": _layer_windows(model_type, hf, n_layers, where)}
    partial = _rope_parameters(hf, FULL).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        rotary["dims"] = int(head_dim * partial)
    if model_type in GEMMA:
        norm.update(placement="sandwich", gemma=True)
        attention.update(scale=float(hf.get("query_pre_attn_scalar") or head_dim) ** -0.5,
                         softcap=float(hf.get("attn_logit_softcapping") or 0.0))
        scales.update(embed_scale=hf["hidden_size"] ** 0.5,
                      logit_softcap=float(hf.get("final_logit_softcapping") or 0.0))
    if model_type in ("qwen3", "gemma3_text", "qwen3_moe", *HYBRID) or (model_type == "glm4_moe"
                                                                         and hf.get("use_qk_norm")):
        attention["qk_norm"] = "head"
    if model_type in HYBRID:  # (1 + w) RMSNorms, q_proj carrying each head's output gate
        norm["gemma"] = True
        attention["output_gate"] = True
    if model_type == "gpt_oss":
        attention["sinks"] = True
    if model_type in SLIDING_THETA:  # Gemma 3, OLMo 3
        rotary["sliding"] = _sliding_rope(model_type, hf, head_dim, bool(attention["windows"]), where)
    if model_type in ("olmo2", "olmo3"):
        norm["placement"] = "post"
    if model_type in ("olmo2", "olmoe", "olmo3"):
        attention["qk_norm"] = "projection"
    if model_type == "ministral3":
        attention.update(_query_scale(hf, where))
    if model_type == "smollm3" and hf.get("no_rope_layers"):
        rotary["layers"] = tuple(bool(x) for x in hf["no_rope_layers"])
    if model_type == "granite":
        attention["scale"] = float(hf.get("attention_multiplier", head_dim ** -0.5))
        scales.update(embed_scale=float(hf.get("embedding_multiplier", 1.0)),
                      residual_scale=float(hf.get("residual_multiplier", 1.0)),
                      logit_scale=float(hf.get("logits_scaling", 1.0)))
    return {**scales, "rotary": rotary, "norm": norm, "attention": attention}


def _layer_windows(model_type: str, hf: dict, n_layers: int, where: str) -> tuple[int, ...]:
    """Each layer's sliding window (0: full attention), from ``layer_types`` where the file has them."""
    window = hf.get("sliding_window", 4096 if model_type == "olmo3" else None)  # Olmo3Config's default
    if model_type in QWEN_WINDOWS and not hf.get("use_sliding_window", False):
        window = None
    if not window:
        return ()
    types = hf.get("layer_types")
    if model_type == "ministral3" and types is not None and set(types) != {"sliding_attention"}:
        raise SftplugError(f"{where}: layer_types name full_attention layers beside sliding_window {window}, but "
                           "transformers' Ministral 3 applies the window to every layer (and cannot generate with "
                           "such layer_types); sftplug does not guess which is meant")
    if types is None:  # files written before layer_types: each family's own rule
        if model_type in QWEN_WINDOWS:
            first = hf.get("max_window_layers", 0)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
        elif model_type == "gemma2":
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        elif model_type == "gemma3_text":
            pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
        elif model_type == "olmo3":  # every fourth layer full attention
            types = ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(n_layers)]
        else:  # Mistral, Phi-3: every layer
            types = ["sliding_attention"] * n_layers
    if len(types) != n_layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise SftplugError(f"{where}: layer_types must name full_attention or sliding_attention for each of the "
                           f"{n_layers} layers")
    return tuple(int(window) if kind == "sliding_attention" else 0 for kind in types)


def _rope_parameters(hf: dict, kind: str) -> dict:
    """config.json's rope_parameters (transformers 5) for the layers of this kind: the family's one
    dict, or the kind's own where it has one per layer kind; {} in files of transformers 4."""
    params = hf.get("rope_parameters")
    if not isinstance(params, dict):
        return {}
    return (params.get(kind) or {}) if _per_kind(hf) else params


def _per_kind(hf: dict) -> bool:
    """Whether rope_parameters holds one dict per layer kind (Gemma 3, OLMo 3)."""
    params = hf.get("rope_parameters")
    return isinstance(params, dict) and (FULL in params or SLIDING in params)


def _sliding_rope(model_type: str, hf: dict, head_dim: int, has_windows: bool, where: str) -> Rope | None:
    """The sliding-window layers' own RoPE, or None where it is the full-attention layers'."""
    if _per_kind(hf):
        theta, scaling = _rope_from_hf(hf, where, SLIDING)
        partial = _rope_parameters(hf, SLIDING).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    else:  # transformers 4's files: unscaled, at a base of their own (OLMo 3: transformers' default, whatever
        # rope_theta says, as transformers 5 reads these files)
        theta, scaling = hf.get("rope_local_base_freq", SLIDING_THETA[model_type]), None
        partial = hf.get("partial_rotary_factor", 1.0)
    full_partial = _rope_parameters(hf, FULL).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if (theta, scaling, partial) == (*_rope_from_hf(hf, where), full_partial):
        return None
    if not has_windows:  # sftplug tells the kinds apart by their windows
        raise SftplugError(f"{where}: layer_types name sliding_attention layers with a RoPE of their own, but "
                           "sliding_window is not set; sftplug cannot tell those layers apart")
    return Rope(theta=float(theta), scaling=scaling, dims=int(head_dim * partial))


def _query_scale(hf: dict, where: str) -> dict:
    """Ministral 3's queries scaled by 1 + beta * log(1 + floor(position / original_max_position_embeddings))
    after RoPE (Llama 4's), with rope_parameters' llama_4_scaling_beta and original length."""
    params = _rope_parameters(hf, FULL) or hf.get("rope_scaling") or {}  # transformers 5's, or 4's
    beta = params.get("llama_4_scaling_beta")
    _, scaling = _rope_from_hf(hf, where)
    period = (scaling or {}).get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    if beta is None or not period:
        raise SftplugError(f"{where}: ministral3's rope_parameters need llama_4_scaling_beta and "
                           "original_max_position_embeddings (transformers scales its queries with them)")
    return {"query_scale_beta": float(beta), "query_scale_period": int(period)}


def _rope_from_hf(hf: dict, where: str, kind: str = FULL) -> tuple[float, dict | None]:
    """The RoPE base and scaling of the layers of this kind (FULL: every layer's, unless the family
    has a RoPE per layer kind)."""
    params = _rope_parameters(hf, kind)  # transformers 5: rope_theta lives inside
    if params:
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if _per_kind(hf):  # transformers reads YaRN's truncate at rope_parameters' top, never in a kind's dict
            scaling.pop("truncate", None)
    else:  # transformers 4: rope_theta + rope_scaling
        theta, scaling = hf.get("rope_theta", 10000.0), hf.get("rope_scaling")
    scaling = {k: v for k, v in (scaling or {}).items() if k != "llama_4_scaling_beta"}  # the queries' (Ministral 3)
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type not in ("llama3", "linear", "longrope", "yarn"):
        raise SftplugError(f"{where}: rope type {rope_type!r} is not supported (supported: default, llama3, linear, "
                           "longrope, yarn)")
    scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if rope_type == "longrope":
        scaling = _longrope(scaling, hf, where)
    if rope_type == "yarn":  # made explicit as transformers standardises it: a top-level original length wins,
        # but not over a layer kind's own dict
        top = None if _per_kind(hf) else hf.get("original_max_position_embeddings")
        original = top or scaling.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
        if "factor" not in scaling or not original:
            raise SftplugError(f"{where}: rope type 'yarn' needs factor and original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = original
        if scaling["factor"] is None:  # DeepSeek-V3: the ratio of the context lengths
            scaling["factor"] = hf.get("max_position_embeddings", 2048) / original
    return theta, scaling


def _longrope(scaling: dict, hf: dict, where: str) -> dict:
    """LongRoPE's parameters made explicit, as transformers derives them (Phi-3/4)."""
    original = scaling.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
    if not original or "short_factor" not in scaling:
        raise SftplugError(f"{where}: rope type 'longrope' needs original_max_position_embeddings and short_factor")
    factor = scaling.get("factor") or hf.get("max_position_embeddings", original) / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {**scaling, "rope_type": "longrope", "original_max_position_embeddings": original,
            "attention_factor": attention}


def check_exportable(config: ModelConfig) -> None:
    """Refuse, in one line, a model transformers has no class for (a third-party architecture)."""
    if config.architecture not in ARCHITECTURES:
        raise SftplugError(f"cannot export a '{config.architecture}' model as an HF folder: transformers has no such "
                           f"model type (sftplug exports {', '.join(ARCHITECTURES)})")


def config_to_hf(config: ModelConfig, dtype: torch.dtype, tokenizer=None) -> dict:
    """The config.json that makes transformers build the same model as ``config``."""
    check_exportable(config)
    arch = config.architecture
    if config.attention.qkv_bias and arch not in QKV_BIAS or config.attention.o_bias and arch not in O_BIAS:
        raise SftplugError(f"cannot export a {arch} model with biases on its attention projections: {arch} has none")
    hf = {k: v for k, v in config.extra.items()
          if k not in ("transformers_version", "_name_or_path", "language_model_of")}
    hf.update(
        architectures=[ARCHITECTURES[arch]],
        model_type=arch,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        rms_norm_eps=config.norm.eps,
        max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=config.tie_embeddings,
    )
    if arch not in GEMMA:
        hf["hidden_act"] = "silu"
    if "head_dim" in hf or config.head_dim != config.hidden_size // config.n_heads:
        hf["head_dim"] = config.head_dim
    if arch == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    # Ministral 3 keeps its queries' scale among RoPE's parameters
    queries = {"llama_4_scaling_beta": config.attention.query_scale_beta} if config.attention.query_scale_beta else {}
    if _per_kind(hf):  # per layer kind (Gemma 3, OLMo 3): as the source has it, which sftplug read whole
        pass
    elif "rope_parameters" in hf:  # keep the source's config style (transformers 5)
        rotary = config.rotary
        partial = {"partial_rotary_factor": rotary.dims / config.head_dim} if rotary.dims != config.head_dim else {}
        hf["rope_parameters"] = {"rope_type": "default", **(rotary.scaling or {}), "rope_theta": rotary.theta,
                                 **partial, **queries}
    else:
        scaling = {**(config.rotary.scaling or {}), **queries} or None
        hf.update(rope_theta=config.rotary.theta, rope_scaling=scaling)
    hf["dtype" if "dtype" in hf else "torch_dtype"] = hf_dtype_name(dtype)
    if tokenizer is not None:
        for key, value in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id)):
            if hf.get(key) is None and value is not None:
                hf[key] = value
        if hf.get("pad_token_id") is None and tokenizer.pad_token is not None:
            hf["pad_token_id"] = tokenizer.pad_id
    return dict(sorted(hf.items()))
