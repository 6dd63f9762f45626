"""The dense families sftplug loads, each from a random HF checkpoint saved by transformers:
logits equal to transformers' (fp32, 1e-4 of their scale) with the family's options on
(sliding windows shorter than the sequence, partial rotary, RoPE per layer kind, queries scaled
by position, soft-capping, multipliers)."""

import pytest
import torch

import sftplug
from sftplug.errors import SftplugError
from sftplug.hf.config import config_from_hf
from sftplug.loading import load_model

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(1))
FAMILIES = {  # make_hf_folder options (tests/conftest.py); windows of 16 < 40 tokens
    "mistral-window": dict(config_class="MistralConfig", head_dim=16, sliding_window=16),
    "qwen2-window": dict(config_class="Qwen2Config", use_sliding_window=True, sliding_window=16,
                         max_window_layers=1),  # layer 0 full, layer 1 windowed
    "qwen3": dict(config_class="Qwen3Config", head_dim=32),  # explicit head_dim != hidden / heads
    "gemma2": dict(config_class="Gemma2Config", head_dim=32, query_pre_attn_scalar=24, sliding_window=16,
                   attn_logit_softcapping=0.5, final_logit_softcapping=0.5),  # caps small enough to bite
    "gemma3": dict(config_class="Gemma3TextConfig", head_dim=32, query_pre_attn_scalar=24, sliding_window=16,
                   layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(config_class="Phi3Config", partial_rotary_factor=0.5, sliding_window=16, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2),
    "phi4-mini": dict(config_class="Phi3Config", partial_rotary_factor=0.75, max_position_embeddings=256,
                      original_max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                    "long_factor": [3.0] * 6}),  # LongRoPE on 3/4 of each head
    "olmo2": dict(config_class="Olmo2Config", pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "smollm3": dict(config_class="SmolLM3Config", no_rope_layer_interval=2, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2),  # layer 1 has no RoPE
    "granite": dict(config_class="GraniteConfig", embedding_multiplier=12.0, residual_multiplier=0.22,
                    attention_multiplier=0.05, logits_scaling=8.0),
    # layer 0 sliding with a RoPE of its own, layer 1 full with YaRN (as OLMo 3's long-context configs)
    "olmo3": dict(config_class="Olmo3Config", sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
                                   "full_attention": {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0,
                                                      "original_max_position_embeddings": 16}},
                  pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # Ministral-3's RoPE parameters, but queries scaled up every 8 positions (its original length)
    "ministral3": dict(config_class="Ministral3Config", head_dim=16, sliding_window=16,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                                        "original_max_position_embeddings": 8, "beta_fast": 32.0, "beta_slow": 1.0,
                                        "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1},
                       pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


def relative_error(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(tmp_path, family, make_hf_folder):
    reference = make_hf_folder(tmp_path, **FAMILIES[family])
    model = load_model(str(tmp_path)).model  # auto: a backend that applies the windows
    with torch.no_grad():
        got, ref = model(IDS), reference(IDS).logits
    assert got.shape == ref.shape == (2, 40, 1024)
    assert relative_error(got, ref) <= 1e-4, f"{family}: {relative_error(got, ref):.2e}"


def test_longrope_refuses_rows_longer_than_its_short_factors_cover(tmp_path, make_hf_folder):
    make_hf_folder(tmp_path, **FAMILIES["phi4-mini"])
    model = load_model(str(tmp_path)).model
    assert model.attention_options(seq_len=64) == {}
    with pytest.raises(SftplugError, match="beyond original_max_position_embeddings=64, which sftplug does not "
                                           "apply; use --seq-len 64 or less"):
        model.attention_options(seq_len=65)


def test_a_window_longer_than_the_rows_is_no_window(tmp_path, make_hf_folder):
    make_hf_folder(tmp_path, config_class="MistralConfig", head_dim=16, sliding_window=64)
    model = sftplug.load_model(str(tmp_path))
    assert model.attention_options(seq_len=40) == {} and model.attention_options(seq_len=128) == {"window": 64}


@pytest.mark.parametrize("key,value,message", [
    ("num_local_experts", 8, "num_local_experts (a mixture of experts) is not supported"),
    ("vision_config", {"hidden_size": 8}, "vision_config (a vision tower) is not supported"),
    ("rope_scaling", {"rope_type": "dynamic", "factor": 4.0}, "rope type 'dynamic' is not supported"),
    ("hidden_act", "relu", "hidden_act 'relu' is not supported"),
    ("layer_types", ["full_attention", "chunked_attention"], "layer_types must name full_attention or "
                                                               "sliding_attention"),
])
def test_what_cannot_run_exactly_is_refused_naming_the_key(key, value, message):
    hf = dict(model_type="mistral", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, sliding_window=8, **{key: value})
    with pytest.raises(SftplugError) as info:
        config_from_hf(hf, where="ckpt/config.json")
    assert str(info.value).startswith("ckpt/config.json: ") and message in str(info.value)


@pytest.mark.parametrize("options,message", [
    (dict(layer_types=["sliding_attention", "full_attention"]), "transformers' Ministral 3 applies the window to "
                                                                 "every layer"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}), "ministral3's rope_parameters need "
                                                                         "llama_4_scaling_beta"),
])
def test_ministral3_configs_transformers_runs_otherwise_are_refused(options, message):
    hf = dict(model_type="ministral3", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, sliding_window=8, rope_parameters=FAMILIES["ministral3"]["rope_parameters"])
    with pytest.raises(SftplugError) as info:
        config_from_hf({**hf, **options}, where="ckpt/config.json")
    assert str(info.value).startswith("ckpt/config.json: ") and message in str(info.value)


def test_olmo3_files_of_transformers_4_get_transformers_5s_rope_per_layer_kind():
    """OLMo 3's published config.json: rope_theta and a YaRN rope_scaling, which transformers 5 gives the
    full-attention layers only; the sliding layers get OLMo 3's default base, whatever rope_theta says."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from sftplug.model.rope import rope_attention_factor, rope_inv_freq

    hf = dict(model_type="olmo3", vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
              num_attention_heads=4, max_position_embeddings=256, sliding_window=16, rope_theta=20000.0,
              rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                            "attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1})
    config = config_from_hf(dict(hf))
    reference = transformers.Olmo3Config(**{k: v for k, v in hf.items() if k != "model_type"})
    assert config.attention.windows == (16, 16, 16, 0)  # every fourth layer full, as reference.layer_types
    for kind in ("full_attention", "sliding_attention"):
        rope_type = reference.rope_parameters[kind]["rope_type"]
        init = ROPE_INIT_FUNCTIONS[rope_type] if rope_type != "default" else None
        inv_freq, factor = (init(reference, "cpu", layer_type=kind) if init else
                            (1.0 / reference.rope_parameters[kind]["rope_theta"] ** (torch.arange(0, 16, 2) / 16), 1.0))
        assert torch.allclose(rope_inv_freq(config, kind), inv_freq.float(), rtol=1e-6, atol=0), kind
        assert rope_attention_factor(config, kind) == factor, kind
    assert config.rotary.sliding.theta == 500000.0 and config.rotary.sliding.scaling is None
