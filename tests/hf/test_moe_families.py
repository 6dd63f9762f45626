"""The mixture-of-experts families sftplug loads, each from a random HF checkpoint saved by
transformers (experts one by one as transformers 5 saves them, gpt-oss's stacked): logits
equal to transformers' (fp32, 1e-4 of their scale) with sliding windows shorter than the
sequence, attention sinks, shared experts, dense layers beside MoE layers, group-limited routing."""

import pytest
import torch

from sftplug.errors import SftplugError
from sftplug.hf.config import config_from_hf
from sftplug.loading import load_model

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(1))
EXPERTS = dict(num_experts_per_tok=2, head_dim=16)
FAMILIES = {  # make_hf_folder options (tests/conftest.py): 8 experts of 32, top 2; windows of 16 < 40 tokens
    "qwen3_moe": dict(config_class="Qwen3MoeConfig", num_experts=8, moe_intermediate_size=32, norm_topk_prob=True,
                      mlp_only_layers=[1], **EXPERTS),  # layer 1 a dense MLP
    "qwen2_moe": dict(config_class="Qwen2MoeConfig", num_experts=8, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, **EXPERTS),  # a gated shared expert
    "mixtral": dict(config_class="MixtralConfig", num_local_experts=8, intermediate_size=32, sliding_window=16,
                    **EXPERTS),
    "olmoe": dict(config_class="OlmoeConfig", num_experts=8, intermediate_size=32, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, **EXPERTS),  # q/k norms over the whole projection
    "glm4_moe": dict(config_class="Glm4MoeConfig", n_routed_experts=8, moe_intermediate_size=32,
                     first_k_dense_replace=1, n_group=4, topk_group=2, n_shared_experts=1, use_qk_norm=True,
                     partial_rotary_factor=0.5, routed_scaling_factor=2.5, attention_bias=True, **EXPERTS),
    "gpt_oss": dict(config_class="GptOssConfig", num_local_experts=8, intermediate_size=32, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"], **EXPERTS),  # sinks, YaRN, biases
}


def relative_error(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(tmp_path, family, make_hf_folder):
    reference = make_hf_folder(tmp_path, **FAMILIES[family])
    model = load_model(str(tmp_path), dtype=torch.float32).model
    assert model.config.has_experts
    with torch.no_grad():
        got, ref = model(IDS), reference(IDS).logits
    assert got.shape == ref.shape == (2, 40, 1024)
    assert relative_error(got, ref) <= 1e-4, f"{family}: {relative_error(got, ref):.2e}"


def test_a_sharded_checkpoint_loads_its_experts_from_every_shard(tmp_path, make_hf_folder):
    reference = make_hf_folder(tmp_path, max_shard_size="200KB", **FAMILIES["qwen3_moe"])
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    with torch.no_grad():
        got, ref = load_model(str(tmp_path), dtype=torch.float32).model(IDS), reference(IDS).logits
    assert relative_error(got, ref) <= 1e-4


def test_each_family_routes_every_token_as_transformers_does(tmp_path, make_hf_folder):
    """The chosen experts of each layer equal transformers' router's, token for token (ties broken alike)."""
    for family in ("qwen3_moe", "glm4_moe", "gpt_oss"):
        reference = make_hf_folder(tmp_path / family, **FAMILIES[family])
        model = load_model(str(tmp_path / family), dtype=torch.float32).model
        x = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
        for ours, theirs in zip(model.layers, reference.model.layers):
            if not hasattr(ours.mlp, "router"):
                continue
            router = getattr(theirs.mlp, "router", None) or theirs.mlp.gate
            with torch.no_grad():
                _, weights, experts = ours.mlp.router(x)
                _, ref_weights, ref_experts = router(x)
            assert torch.equal(experts.sort(-1).values, ref_experts.sort(-1).values), family
            order, ref_order = experts.argsort(-1), ref_experts.argsort(-1)
            assert torch.allclose(weights.gather(1, order), ref_weights.gather(1, ref_order), rtol=1e-6), family


@pytest.mark.parametrize("key, value, message", [
    ("kv_lora_rank", 512, r"kv_lora_rank \(multi-head latent attention\) is not supported"),
    ("router_jitter_noise", 0.1, "router_jitter_noise=0.1 .* is not supported; set it to 0.0"),
    ("num_experts_per_tok", 9, "experts top_k 9 must be between 1 and the 8 experts"),
])
def test_what_cannot_run_exactly_is_refused_in_one_line(key, value, message):
    hf = dict(model_type="mixtral", vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
              num_attention_heads=4, num_local_experts=8, num_experts_per_tok=2)
    hf[key] = value
    with pytest.raises(SftplugError, match=f"^config.json: {message}"):
        config_from_hf(hf)


def test_multi_head_latent_attention_families_are_refused_naming_model_type():
    with pytest.raises(SftplugError, match="^config.json: model_type 'deepseek_v3' is not supported"):
        config_from_hf(dict(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=16,
                            num_hidden_layers=1, num_attention_heads=4))


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])
def test_generation_gives_transformers_greedy_answer(tmp_path, family, make_hf_folder):
    """Past the 16-token window, with sinks (gpt-oss) in the cached attention."""
    from sftplug.model.generate import generate_ids

    reference = make_hf_folder(tmp_path, **FAMILIES[family])
    model = load_model(str(tmp_path), dtype=torch.float32).model
    prompt = IDS[0, :12].tolist()
    want = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, 12:].tolist()
    assert generate_ids(model, prompt, 12, eos_id=None) == want
