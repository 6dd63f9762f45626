"""Gemma 4's config.json (``gemma4_text``, or a ``gemma4`` folder's text_config) -> ModelConfig.

Sliding-window and full-attention layers as ``layer_types`` says (the last layer full, as
transformers forces it), each kind with its own RoPE (the full layers' "proportional": the
first angles of their own head_dim rotated, the rest with frequency 0), the full layers' own
head shape from ``per_layer_config`` (or ``global_head_dim`` and ``num_global_key_value_heads``
as transformers reads them), the options of sftplug.model.config.Gemma4Options, and the experts
beside each MLP where ``enable_moe_block`` (ModelConfig.experts, router "gemma4"). What
sftplug does not run exactly is refused in one line naming the key.
"""

from __future__ import annotations

from sftplug.errors import SftplugError
from sftplug.model.config import (
    AttentionConfig,
    ExpertsConfig,
    FeedForwardConfig,
    Gemma4Options,
    LayerType,
    ModelConfig,
    NormConfig,
    Rope,
    RotaryConfig,
)

GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")
# keys sftplug cannot run exactly when set: key -> what it means
REFUSED = {"use_bidirectional_attention": "bidirectional attention", "attention_bias": "biases on q/k/v/o"}
LAYER_KINDS = ("sliding_attention", "full_attention")


def gemma4_config(hf: dict, where: str) -> ModelConfig:
    """The ModelConfig of a gemma4_text config.json; the source is kept in ``extra``."""
    for key, what in REFUSED.items():
        if hf.get(key):
            raise SftplugError(f"{where}: {key}={hf[key]!r} ({what}) is not supported; sftplug cannot run it exactly")
    if float(hf.get("attention_dropout") or 0.0):
        raise SftplugError(f"{where}: attention_dropout={hf['attention_dropout']} is not supported; set it to 0.0")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int):
            raise SftplugError(f"{where}: {key} is missing or not an integer")
    activation = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    if activation not in GELU_TANH:
        raise SftplugError(f"{where}: hidden_activation {activation!r} is not supported (Gemma 4 runs "
                           f"{', '.join(GELU_TANH)})")
    n_layers, n_heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    kinds = layer_kinds(hf, n_layers, where)
    shared = int(hf.get("num_kv_shared_layers") or 0)
    if shared and (shared >= n_layers or set(kinds[n_layers - shared:]) - set(kinds[:n_layers - shared])):
        raise SftplugError(f"{where}: num_kv_shared_layers={shared}: each sharing layer needs an earlier layer of its "
                           "kind to share the keys and values of")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    full_head_dim, full_kv_heads = full_head_shape(hf, kinds, where)
    local, full = rope_of_kinds(hf, where)
    per_layer_size = int(hf.get("hidden_size_per_layer_input") or 0)
    experts, layer_types = experts_of(hf, where)
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            n_layers=n_layers, n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=head_dim, max_seq_len=int(hf.get("max_position_embeddings", 131072)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)), architecture="gemma4_text", extra=dict(hf),
            rotary=RotaryConfig(theta=full["rope_theta"], scaling=full["scaling"], dims=full_head_dim or head_dim,
                                sliding=Rope(theta=local["rope_theta"], dims=head_dim)),
            norm=NormConfig(eps=float(hf.get("rms_norm_eps", 1e-6)), placement="sandwich"),
            attention=AttentionConfig(qk_norm="head", scale=1.0, windows=tuple(
                int(hf.get("sliding_window") or 512) if kind == "sliding_attention" else 0 for kind in kinds)),
            feed_forward=FeedForwardConfig(activation="gelu_tanh"), experts=experts, layer_types=layer_types,
            gemma4=Gemma4Options(
                per_layer_input_size=per_layer_size,
                per_layer_input_vocab=int(hf.get("vocab_size_per_layer_input") or hf["vocab_size"]) * bool(
                    per_layer_size),
                full_head_dim=full_head_dim, full_kv_heads=full_kv_heads,
                full_k_eq_v=bool(hf.get("attention_k_eq_v")), kv_shared_layers=shared,
                double_wide_shared_mlp=bool(hf.get("use_double_wide_mlp"))),
            embed_scale=hf["hidden_size"] ** 0.5,
            logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
        )
    except ValueError as exc:
        raise SftplugError(f"{where}: {exc}") from None


def experts_of(hf: dict, where: str) -> tuple[ExpertsConfig, tuple[LayerType, ...]]:
    """Where enable_moe_block: the experts beside every layer's MLP (sftplug.model.gemma4_moe), and the layers'
    feed-forward kind "experts"; else none."""
    if not hf.get("enable_moe_block"):
        return ExpertsConfig(), ()
    for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
        if not isinstance(hf.get(key), int) or hf[key] < 1:
            raise SftplugError(f"{where}: enable_moe_block needs {key} as a positive integer, got {hf.get(key)!r}")
    if hf["top_k_experts"] > hf["num_experts"]:
        raise SftplugError(f"{where}: top_k_experts {hf['top_k_experts']} exceeds num_experts {hf['num_experts']}")
    experts = ExpertsConfig(count=hf["num_experts"], top_k=hf["top_k_experts"],
                            intermediate_size=hf["moe_intermediate_size"], router="gemma4", norm_top_k=True,
                            activation="gelu_tanh")
    return experts, (LayerType(feed_forward="experts"),) * hf["num_hidden_layers"]


def layer_kinds(hf: dict, n_layers: int, where: str) -> list[str]:
    """Each layer's kind: layer_types, or transformers' default (every sixth layer full); the last layer full."""
    kinds = hf.get("layer_types")
    if kinds is None:
        kinds = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layers)]
    if len(kinds) != n_layers or not set(kinds) <= set(LAYER_KINDS):
        raise SftplugError(f"{where}: layer_types must name full_attention or sliding_attention for each of the "
                           f"{n_layers} layers")
    return [*kinds[:-1], "full_attention"]  # transformers forces the last layer to full attention


def full_head_shape(hf: dict, kinds: list[str], where: str) -> tuple[int, int]:
    """The full-attention layers' head_dim and key/value heads (0: the model's own), as transformers reads them."""
    overrides = hf.get("per_layer_config")
    if overrides is None:  # transformers' defaults: global_head_dim 512; the kv heads only with attention_k_eq_v
        kv_heads = hf.get("num_global_key_value_heads") if hf.get("attention_k_eq_v") else None
        return int(hf.get("global_head_dim", 512)), int(kv_heads or 0)
    full = {i for i, kind in enumerate(kinds) if kind == "full_attention"}
    shapes = {int(i): (o.get("head_dim", 0), o.get("num_key_value_heads", 0)) for i, o in overrides.items()}
    unknown = {k for o in overrides.values() for k in o} - {"head_dim", "num_key_value_heads"}
    if unknown or set(shapes) - full or len({shapes.get(i, (0, 0)) for i in full}) > 1:
        raise SftplugError(f"{where}: per_layer_config: sftplug runs one head_dim and num_key_value_heads for all "
                           f"full-attention layers and none of its own for sliding ones; got {overrides}")
    return shapes.get(min(full), (0, 0)) if full else (0, 0)


def rope_of_kinds(hf: dict, where: str) -> tuple[dict, dict]:
    """The sliding layers' and the full layers' RoPE: theta, and for the full layers the scaling and dims."""
    params = hf.get("rope_parameters") or {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}
    local, full = params.get("sliding_attention") or {}, params.get("full_attention") or {}
    for kind, rope in (("sliding_attention", local), ("full_attention", full)):
        allowed = ("default", "proportional") if kind == "full_attention" else ("default",)
        if rope.get("rope_type", "default") not in allowed:
            raise SftplugError(f"{where}: rope_parameters.{kind}.rope_type {rope.get('rope_type')!r} is not supported "
                               f"(sftplug runs {', '.join(allowed)} there)")
        extra = set(rope) - {"rope_type", "rope_theta", "partial_rotary_factor", "factor"}
        if extra or (kind == "sliding_attention" and rope.get("partial_rotary_factor", 1.0) != 1.0):
            raise SftplugError(f"{where}: rope_parameters.{kind} {rope} is not supported")
    scaling = None
    if full.get("rope_type") == "proportional":
        scaling = {"rope_type": "proportional", "partial_rotary_factor": float(full.get("partial_rotary_factor", 1.0)),
                   "factor": float(full.get("factor", 1.0))}
    elif full.get("partial_rotary_factor", 1.0) != 1.0:
        raise SftplugError(f"{where}: rope_parameters.full_attention: partial_rotary_factor with rope_type default is "
                           "not supported")
    return ({"rope_theta": float(local.get("rope_theta", 10_000.0))},
            {"rope_theta": float(full.get("rope_theta", 10_000.0)), "scaling": scaling})
