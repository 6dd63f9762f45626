"""The mixture-of-experts options of the MoE families' config.json: Qwen3-MoE, Qwen2-MoE,
Mixtral, OLMoE, GLM-4.5 (glm4_moe) and gpt-oss, as ModelConfig.experts and each layer's
feed-forward kind (dense MLP or experts)."""

from __future__ import annotations

from sftplug.errors import SftplugError
from sftplug.model.config import ExpertsConfig

# model_type -> the config.json key that counts its routed experts (Qwen3-MoE's changed in transformers 5)
EXPERT_COUNT_KEYS = {"qwen3_moe": "num_local_experts", "qwen2_moe": "num_experts", "olmoe": "num_experts",
                     "mixtral": "num_local_experts", "gpt_oss": "num_local_experts", "glm4_moe": "n_routed_experts",
                     "qwen3_next": "num_experts", "qwen3_5_moe_text": "num_experts"}
# Families whose MoE layers add a shared expert behind a sigmoid gate
GATED_SHARED_EXPERT = ("qwen2_moe", "qwen3_next", "qwen3_5_moe_text")
EARLIER_COUNT_KEYS = {"qwen3_moe": "num_experts"}


def experts_from_hf(model_type: str, hf: dict, where: str) -> tuple[ExpertsConfig, tuple[str, ...]]:
    """The experts' options and each layer's feed-forward kind; a dense family gets neither."""
    if model_type not in EXPERT_COUNT_KEYS:
        return ExpertsConfig(), ()
    key = EXPERT_COUNT_KEYS[model_type]
    count = _int(hf, key if key in hf else EARLIER_COUNT_KEYS.get(model_type, key), where)
    top_k = _int(hf, "num_experts_per_tok", where)
    options = dict(count=count, top_k=top_k, aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
                   norm_top_k=bool(hf.get("norm_topk_prob", False)),
                   intermediate_size=hf.get("moe_intermediate_size") or hf["intermediate_size"])
    if float(hf.get("router_jitter_noise") or 0.0):
        raise SftplugError(f"{where}: router_jitter_noise={hf['router_jitter_noise']} (random noise on the router's "
                           "input in training) is not supported; set it to 0.0")
    n_layers = hf["num_hidden_layers"]
    moe_layers = [True] * n_layers
    if model_type in ("qwen3_moe", "qwen2_moe", "qwen3_next"):
        step, dense = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or ())
        moe_layers = [i not in dense and (i + 1) % step == 0 for i in range(n_layers)]
    if model_type in GATED_SHARED_EXPERT:
        options.update(shared_size=_int(hf, "shared_expert_intermediate_size", where), shared_gate=True)
    if model_type in ("mixtral", "qwen3_5_moe_text"):
        options["norm_top_k"] = True
    if model_type == "glm4_moe":
        first_dense = hf.get("first_k_dense_replace") or 0
        moe_layers = [i >= first_dense for i in range(n_layers)]
        options.update(router="sigmoid_groups", groups=hf.get("n_group") or 1, top_groups=hf.get("topk_group") or 1,
                       scale=float(hf.get("routed_scaling_factor", 1.0)),
                       shared_size=options["intermediate_size"] * (hf.get("n_shared_experts") or 0))
    if model_type == "gpt_oss":
        options.update(router="logits", router_bias=True, bias=True, activation="clamped_swiglu", transposed=True,
                       swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
                       swiglu_limit=float(hf.get("swiglu_limit", 7.0)))
    try:
        experts = ExpertsConfig(**options)
    except ValueError as exc:
        raise SftplugError(f"{where}: {exc}") from None
    return experts, tuple("experts" if moe else "mlp" for moe in moe_layers)


def _int(hf: dict, key: str, where: str) -> int:
    value = hf.get(key)
    if not isinstance(value, int) or value < 1:
        raise SftplugError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value
