"""ModelConfig's groups, the flat dicts of older checkpoints, and blocks built by layer kind."""

import json

import pytest
import torch
import torch.nn as nn

from sftplug.model import transformer
from sftplug.model.config import AttentionConfig, LayerType, ModelConfig, NormConfig, Rope, RotaryConfig
from sftplug.model.generate import generate_ids

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, n_layers=2, n_heads=4, n_kv_heads=2)
# A Gemma-like model_config as checkpoints saved it before the options were grouped.
FLAT = {**SMALL, "head_dim": 8, "rope_theta": 10000.0, "rope_scaling": None, "rms_norm_eps": 1e-6,
        "max_seq_len": 2048, "tie_embeddings": True, "qkv_bias": False, "init_std": 0.02, "architecture": "gemma3_text",
        "extra": {}, "layer_windows": [16, 0], "rotary_dim": 8, "rope_local_theta": 1000.0, "rope_layers": [],
        "qk_norm": "head", "norms": "sandwich", "gemma_norm": True, "activation": "gelu_tanh", "embed_scale": 5.0,
        "residual_scale": 1.0, "attn_scale": 0.25, "attn_softcap": 0.0, "logit_scale": 1.0, "logit_softcap": 0.0}


def test_an_old_flat_config_reads_into_the_groups():
    config = ModelConfig.from_dict(FLAT)
    assert config.rotary == RotaryConfig(theta=10000.0, dims=8, sliding=Rope(theta=1000.0, dims=8))
    assert config.norm == NormConfig(eps=1e-6, placement="sandwich", gemma=True)
    assert config.attention == AttentionConfig(qk_norm="head", windows=(16, 0), scale=0.25)
    assert config.feed_forward.activation == "gelu_tanh" and config.embed_scale == 5.0 and config.tie_embeddings


def test_a_saved_config_reads_back_equal():
    config = ModelConfig.from_dict(FLAT)
    saved = json.loads(json.dumps(config.to_dict()))  # as a manifest holds it
    assert ModelConfig.from_dict(saved) == ModelConfig(**saved) == config


@pytest.mark.parametrize("options,message", [
    (dict(norm={"placement": "middle"}), "norm placement 'middle' is not one of 'pre', 'sandwich', 'post'"),
    (dict(attention={"windows": (4,)}), "attention windows has 1 entries for 2 layers"),
    (dict(rotary={"dims": 7}), "rotary dims 7 must be even and at most head_dim 8"),
    (dict(layer_types=[LayerType()]), "layer_types has 1 entries for 2 layers"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**SMALL, **options)


def test_an_unknown_layer_kind_is_refused_naming_the_known_ones():
    config = ModelConfig(**SMALL, layer_types=[LayerType(), LayerType(feed_forward="conv")])
    with pytest.raises(ValueError, match="layer_types: feed-forward 'conv' is not one of 'mlp'"):
        transformer.Transformer(config)


class Cumulative(nn.Module):
    """A token mixer of another kind: a running mean of the projected inputs, its generation state the sum."""

    def __init__(self, config, layer):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, doc_ids=None, cache=None):
        h = self.proj(x)  # [B, T, C]
        past, seen = (0, 0) if cache is None else (cache["sum"], cache["seen"])
        total = past + h.cumsum(1)  # [B, T, C]
        counts = seen + torch.arange(1, x.shape[1] + 1, device=x.device)[None, :, None]
        if cache is not None:
            cache.update(sum=total[:, -1:], seen=seen + x.shape[1])
        return total / counts

    def new_cache(self):
        return {"sum": 0, "seen": 0}

    def set_fused_ops(self, ops):
        pass


def test_a_new_mixer_kind_is_a_module_and_a_config_value(monkeypatch):
    monkeypatch.setitem(transformer.MIXERS, "cumulative", Cumulative)
    config = ModelConfig(**SMALL, layer_types=[LayerType(mixer="cumulative"), LayerType()])
    model = transformer.Transformer(config)
    model.init_weights(0)
    assert isinstance(model.layers[0].attn, Cumulative) and isinstance(model.layers[1].attn, transformer.Attention)
    assert model.layers[0].new_cache() == {"sum": 0, "seen": 0}
    model.set_attention(lambda q, k, v, causal, doc_ids: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal, enable_gqa=True))
    prompt = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    new = generate_ids(model, prompt[0].tolist(), 4, None)  # each layer's own cache, one token at a time
    with torch.no_grad():
        whole = model(torch.tensor([prompt[0].tolist() + new]))
    assert new == whole[0, 8:-1].argmax(-1).tolist()  # the same tokens as one forward over all of them


def test_a_grouped_config_saved_before_rope_per_layer_kind_keeps_its_sliding_layers_base():
    saved = json.loads(json.dumps(ModelConfig.from_dict(FLAT).to_dict()))
    saved["rotary"] = {"theta": 10000.0, "scaling": None, "dims": 8, "local_theta": 1000.0, "layers": []}
    want = RotaryConfig(theta=10000.0, dims=8, sliding=Rope(theta=1000.0, dims=8))
    assert ModelConfig.from_dict(saved).rotary == want
    saved["rotary"]["local_theta"] = 0.0  # no base of their own
    assert ModelConfig.from_dict(saved).rotary == RotaryConfig(theta=10000.0, dims=8)
