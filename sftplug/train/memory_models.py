"""The models of the README's memory table (sftplug.train.memory.table): the Llama shapes, and the
mixtures of experts and hybrids as their public config.json describe them, read as sftplug reads a
checkpoint's."""

from __future__ import annotations

from sftplug.model.config import ModelConfig

# The shapes of the Llama checkpoints' config.json (hidden_size, intermediate_size, ...).
LLAMA = {
    "Llama-3.2-1B": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, n_layers=16, n_heads=32,
                                n_kv_heads=8, head_dim=64, tie_embeddings=True),
    "Llama-3.1-8B": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, n_layers=32, n_heads=32,
                                n_kv_heads=8, head_dim=128),
    "Llama-3.1-70B": ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, n_layers=80,
                                 n_heads=64, n_kv_heads=8, head_dim=128),
}
# Mixtures of experts: their public config.json's shape fields.
MOE_CONFIG_JSON = {
    "Qwen3-30B-A3B": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1000000.0,
                          rms_norm_eps=1e-6, max_position_embeddings=40960, router_aux_loss_coef=0.001,
                          tie_word_embeddings=False),
    "gpt-oss-20b": dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                        num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                        num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                        layer_types=["sliding_attention", "full_attention"] * 12, attention_bias=True,
                        rope_theta=150000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                        rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                                          truncate=False, original_max_position_embeddings=4096),
                        router_aux_loss_coef=0.9, swiglu_limit=7.0, tie_word_embeddings=False),
}
# Hybrids: the text_config of Qwen/Qwen3.5-4B's and Qwen/Qwen3.5-9B's config.json (the published folders are
# vision-language; sftplug trains their language model). Three Gated DeltaNet layers to each gated attention
# layer; the two differ in width, MLP size and the 4B's tied embeddings.
QWEN3_5 = dict(model_type="qwen3_5_text", vocab_size=248320, num_hidden_layers=32, num_attention_heads=16,
               num_key_value_heads=4, head_dim=256, attn_output_gate=True, linear_num_key_heads=16,
               linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
               linear_conv_kernel_dim=4, full_attention_interval=4,
               layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 8, max_position_embeddings=262144,
               rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default", rope_theta=10000000,
                                                       partial_rotary_factor=0.25, mrope_interleaved=True,
                                                       mrope_section=[11, 11, 10]))
HYBRID_CONFIG_JSON = {
    "Qwen3.5-4B": dict(QWEN3_5, hidden_size=2560, intermediate_size=9216, tie_word_embeddings=True),
    "Qwen3.5-9B": dict(QWEN3_5, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False),
}


def from_config_json(table: dict[str, dict]) -> dict[str, ModelConfig]:
    """config.json dicts as ModelConfigs (sftplug.hf.config maps them)."""
    from sftplug.hf.config import config_from_hf

    return {name: config_from_hf(hf, f"{name} config.json") for name, hf in table.items()}


def moe_shapes() -> dict[str, ModelConfig]:
    return from_config_json(MOE_CONFIG_JSON)


def hybrid_shapes() -> dict[str, ModelConfig]:
    return from_config_json(HYBRID_CONFIG_JSON)


def table_models() -> dict[str, ModelConfig]:
    """Every model of the table, in its order."""
    return {**LLAMA, **moe_shapes(), **hybrid_shapes()}
