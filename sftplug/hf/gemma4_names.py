"""Gemma 4's HF tensor names (sftplug.hf.names.hf_layout's table for gemma4_text): q, k and v
apart and only where the layer has them, the per-layer inputs, each block's layer_scalar, and
where enable_moe_block the router and experts beside the MLP."""

from __future__ import annotations

from sftplug.model.config import ModelConfig
from sftplug.model.gemma4 import head_shape, kv_source, mlp_size

# HF norm -> sftplug norm, per block (sandwich norms)
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "attn_post_norm",
         "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "mlp_post_norm"}

# HF norm -> sftplug norm of the MoE feed-forward (sftplug.model.gemma4_moe), where enable_moe_block
EXPERTS_NORMS = {"post_feedforward_layernorm_1": "dense_post_norm", "pre_feedforward_layernorm_2": "experts_norm",
                 "post_feedforward_layernorm_2": "experts_post_norm"}


def gemma4_layout(config: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """HF tensor name -> (sftplug parameter or buffer, first row, end row) for every stored tensor."""
    hidden, o = config.hidden_size, config.gemma4
    plan = {"model.embed_tokens.weight": ("embed_tokens.weight", 0, config.vocab_size),
            "model.norm.weight": ("norm.weight", 0, hidden)}
    if not config.tie_embeddings:
        plan["lm_head.weight"] = ("lm_head.weight", 0, config.vocab_size)
    if o.per_layer_input_size:
        size = config.n_layers * o.per_layer_input_size
        vocab = o.per_layer_input_vocab
        plan.update({"model.embed_tokens_per_layer.weight": ("per_layer_inputs.embed.weight", 0, vocab),
                     "model.per_layer_model_projection.weight": ("per_layer_inputs.projection.weight", 0, size),
                     "model.per_layer_projection_norm.weight": ("per_layer_inputs.norm.weight", 0,
                                                                o.per_layer_input_size)})
    for i in range(config.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        plan.update(_attention(config, i, f"{hf}self_attn.", f"{ours}attn."))
        inter, mlp = mlp_size(config, i), f"{ours}mlp.dense." if config.has_experts else f"{ours}mlp."
        plan.update({f"{hf}mlp.gate_proj.weight": (f"{mlp}gate_up.weight", 0, inter),
                     f"{hf}mlp.up_proj.weight": (f"{mlp}gate_up.weight", inter, 2 * inter),
                     f"{hf}mlp.down_proj.weight": (f"{mlp}down.weight", 0, hidden)})
        if config.has_experts:
            plan.update(_experts(config, hf, f"{ours}mlp."))
        plan.update({f"{hf}{theirs}.weight": (f"{ours}{norm}.weight", 0, hidden) for theirs, norm in NORMS.items()})
        plan[f"{hf}layer_scalar"] = (f"{ours}layer_scalar", 0, 1)
        if o.per_layer_input_size:
            plan.update({f"{hf}per_layer_input_gate.weight": (f"{ours}layer_input.gate.weight", 0,
                                                              o.per_layer_input_size),
                         f"{hf}per_layer_projection.weight": (f"{ours}layer_input.projection.weight", 0, hidden),
                         f"{hf}post_per_layer_input_norm.weight": (f"{ours}layer_input.norm.weight", 0, hidden)})
    return plan


def _experts(config: ModelConfig, hf: str, ours: str) -> dict[str, tuple[str, int, int]]:
    """The router, the stacked experts and their norms (sftplug.model.gemma4_moe), on HF's decoder layer."""
    hidden, count, inter = config.hidden_size, config.experts.count, config.experts.intermediate_size
    plan = {f"{hf}router.proj.weight": (f"{ours}router.weight", 0, count),
            f"{hf}router.scale": (f"{ours}router.scale", 0, hidden),
            f"{hf}router.per_expert_scale": (f"{ours}router.per_expert_scale", 0, count),
            f"{hf}experts.gate_up_proj": (f"{ours}experts.gate_up_proj", 0, count * 2 * inter),
            f"{hf}experts.down_proj": (f"{ours}experts.down_proj", 0, count * hidden)}
    plan.update({f"{hf}{theirs}.weight": (f"{ours}{norm}.weight", 0, hidden) for theirs, norm in EXPERTS_NORMS.items()})
    return plan


def _attention(config: ModelConfig, layer: int, hf: str, ours: str) -> dict[str, tuple[str, int, int]]:
    head_dim, kv_heads = head_shape(config, layer)
    q, kv = config.n_heads * head_dim, kv_heads * head_dim
    plan = {f"{hf}q_proj.weight": (f"{ours}q.weight", 0, q),
            f"{hf}q_norm.weight": (f"{ours}q_norm.weight", 0, head_dim),
            f"{hf}o_proj.weight": (f"{ours}o.weight", 0, config.hidden_size)}
    if kv_source(config, layer) is None:  # a layer reusing another's keys and values stores none
        plan.update({f"{hf}k_proj.weight": (f"{ours}k.weight", 0, kv),
                     f"{hf}k_norm.weight": (f"{ours}k_norm.weight", 0, head_dim)})
        if not (config.gemma4.full_k_eq_v and not config.attention.window(layer)):
            plan[f"{hf}v_proj.weight"] = (f"{ours}v.weight", 0, kv)
    return plan
