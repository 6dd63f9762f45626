"""YaRN RoPE (gpt-oss, DeepSeek) against transformers' own computation of it."""

import pytest
import torch
from transformers import GptOssConfig, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from sftplug.errors import SftplugError
from sftplug.hf.config import config_from_hf
from sftplug.model.config import ModelConfig, RotaryConfig
from sftplug.model.rope import rope_attention_factor, rope_inv_freq
from sftplug.model.transformer import Transformer

BASE = dict(model_type="llama", vocab_size=64, hidden_size=256, intermediate_size=96, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072)
# gpt-oss's own rope_parameters (its config.json and GptOssConfig's defaults)
GPT_OSS = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
           "original_max_position_embeddings": 4096, "rope_theta": 150000.0}
CASES = {
    "gpt-oss": GPT_OSS,
    "truncated": {**GPT_OSS, "truncate": True},
    "truncate-by-default": {k: v for k, v in GPT_OSS.items() if k != "truncate"},
    "deepseek-mscale": {"rope_type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                        "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "rope_theta": 10000.0},
    "implicit-factor": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 8192,
                        "rope_theta": 10000.0},
    "attention-factor-given": {**GPT_OSS, "attention_factor": 1.25, "beta_fast": 16.0, "beta_slow": 2.0},
    "partial-rotary": {**GPT_OSS, "partial_rotary_factor": 0.5},
    "factor-1": {**GPT_OSS, "factor": 1.0},
}


def transformers_yarn(hf_config):
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    return inv_freq, attention_factor


@pytest.mark.parametrize("params", CASES.values(), ids=CASES.keys())
def test_yarn_equals_transformers_bitwise(params):
    hf = {**BASE, "rope_parameters": dict(params)}
    config = config_from_hf(dict(hf))
    inv_freq, attention_factor = transformers_yarn(LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"}))
    assert inv_freq.dtype == rope_inv_freq(config).dtype == torch.float32
    assert torch.equal(rope_inv_freq(config), inv_freq)  # the same fp32 operations in the same order
    assert rope_attention_factor(config) == attention_factor


def test_gpt_oss_config_itself():
    reference = GptOssConfig(num_hidden_layers=1, num_local_experts=4)
    inv_freq, attention_factor = transformers_yarn(reference)
    scaling = {k: v for k, v in reference.rope_parameters.items() if k != "rope_theta"}
    config = ModelConfig(hidden_size=2880, n_heads=64, n_kv_heads=8, head_dim=64, n_layers=1,
                         rotary=RotaryConfig(theta=reference.rope_parameters["rope_theta"], scaling=scaling))
    assert torch.equal(rope_inv_freq(config), inv_freq)
    assert rope_attention_factor(config) == attention_factor
    assert attention_factor > 1  # 0.1 ln 32 + 1: the scale does apply


@pytest.mark.parametrize("name", ["gpt-oss", "deepseek-mscale"])
def test_the_models_cos_and_sin_are_transformers_scaled_ones(name):
    hf = {**BASE, "hidden_size": 64, "num_attention_heads": 4, "rope_parameters": dict(CASES[name])}
    config = config_from_hf(dict(hf))
    with torch.device("meta"):
        model = Transformer(config)
    model.reset_rope("cpu")
    reference = LlamaRotaryEmbedding(LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"}))
    positions = torch.tensor([[0, 1, 7, 4095, 4096, 100_000]])
    x = torch.zeros(1, 6, 16)
    cos_ref, sin_ref = reference(x, positions)  # [B, T, head_dim]: the pairs' values twice
    cos, sin = model.rope(positions, torch.float32)  # [B, T, 1, head_dim / 2]
    half = config.rotary.dims // 2
    # positions times inv_freq in fp32 both ways, then the same cos/sin and the same scale
    assert torch.equal(cos[:, :, 0], cos_ref[..., :half]) and torch.equal(sin[:, :, 0], sin_ref[..., :half])


def test_yarn_without_its_lengths_is_refused_in_one_line():
    hf = {k: v for k, v in BASE.items() if k != "max_position_embeddings"}
    with pytest.raises(SftplugError, match=r"^cfg: rope type 'yarn' needs factor and original_max_position_emb"):
        config_from_hf({**hf, "rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 4096}}, "cfg")
    with pytest.raises(SftplugError, match=r"^cfg: rope type 'yarn' needs factor"):
        config_from_hf({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "cfg")


def test_a_top_level_original_length_wins_as_in_transformers():
    hf = {**BASE, "original_max_position_embeddings": 2048, "rope_parameters": dict(GPT_OSS)}
    config = config_from_hf(dict(hf))
    assert config.rotary.scaling["original_max_position_embeddings"] == 2048
    inv_freq, _ = transformers_yarn(LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"}))
    assert torch.equal(rope_inv_freq(config), inv_freq)
