"""MFU: the model FLOPs of an update, counted by hand for a small model, over the stated peak."""

import pytest
import torch

from sftplug.model.transformer import ModelConfig
from sftplug.train.flops import PEAK_ENV, active_adapter_params, peak_flops, update_flops

CONFIG = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=12, n_layers=2, n_heads=2, n_kv_heads=1)


def test_update_flops_by_hand():
    # per layer: qkv 8x(8+4+4)=128, o 8x8=64, gate_up+down 3x8x12=288 -> 480 weights, 960 over two layers
    # attention: 4 FLOPs x 8 (heads x head dim) x 16/2 keys x 3 passes x 2 layers = 1536 per token
    tokens, targets, seq_len = 32, 10, 16
    full = 6 * 960 * tokens + 1536 * tokens + 6 * 8 * 100 * targets
    lora = 4 * 960 * tokens + 6 * 50 * tokens + 1536 * tokens + 4 * 8 * 100 * targets
    assert update_flops(CONFIG, tokens, targets, seq_len, full=True) == full
    assert update_flops(CONFIG, tokens, targets, seq_len, full=False, adapter_params=50) == lora


def test_a_mixture_of_experts_counts_the_experts_a_token_reaches():
    moe = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=12, n_layers=2, n_heads=2, n_kv_heads=1,
                      experts=dict(count=4, top_k=2, intermediate_size=6, shared_size=5, shared_gate=True),
                      layer_types=[dict(feed_forward="experts"), dict()])
    # layer 0: attention 192, router 8x4=32, 2 experts x 3x8x6=288, shared 3x8x5=120, its gate 8 -> 640
    # layer 1: attention 192 + MLP 288 = 480
    tokens, targets, seq_len = 32, 10, 16
    assert update_flops(moe, tokens, targets, seq_len, full=True) == (6 * 1120 * tokens + 1536 * tokens
                                                                      + 6 * 8 * 100 * targets)
    adapters = [("layers.0.mlp.experts.lora.down_proj.A", torch.zeros(4, 2, 6)),
                ("layers.0.attn.qkv.lora_A", torch.zeros(2, 8))]
    assert active_adapter_params(adapters, moe) == 48 * 2 / 4 + 16  # k / E of the experts' adapters


def test_a_linear_attention_layer_counts_its_projections_and_the_chunked_rule():
    hybrid = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=12, n_layers=2, n_heads=2, n_kv_heads=1,
                         attention=dict(output_gate=True),
                         linear_attention=dict(key_heads=1, value_heads=2, key_head_dim=4, value_head_dim=2,
                                               conv_kernel=4),
                         layer_types=[dict(mixer="linear_attention"), dict()])
    # layer 0: in_proj 8x(4+4+4+4+2+2)=160, out_proj 4x8=32, conv (4+4+4)x4=48, MLP 288 -> 528
    # layer 1: gated attention 8x(2x8+4+4)=192 + o 64 + MLP 288 -> 544
    # the rule per token: 2 heads x 2 x (64x(8+2) + 64x(4+2)/2 + 3x4x2) = 3424; attention 4x8x8 = 256
    tokens, targets, seq_len = 32, 10, 16
    assert update_flops(hybrid, tokens, targets, seq_len, full=True) == (6 * 1072 * tokens + 3 * (3424 + 256) * tokens
                                                                         + 6 * 8 * 100 * targets)


def test_peak_is_stated_or_known(monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert peak_flops(torch.device("cpu"), half=True) is None  # no MFU without a known peak
    monkeypatch.setenv(PEAK_ENV, "2.5")
    assert peak_flops(torch.device("cpu"), half=False) == 2.5e12


def test_mfu_is_recorded_against_the_stated_peak(small_config, registry, monkeypatch, quiet):
    from sftplug.train.setup import build_run

    monkeypatch.setenv(PEAK_ENV, "1")
    run = build_run(small_config(steps=1), registry, echo=quiet)
    record = run.update()
    adapters = sum(p.numel() for p in run.params)
    flops = update_flops(run.model.config, record["tokens"], record["target_tokens"], 64, False, adapters)
    assert record["mfu"] == pytest.approx(flops / record["s_per_update"] / 1e12)


def test_gemma4_counts_each_layer_as_built():
    pytest.importorskip("transformers")
    from transformers import Gemma4TextConfig

    from sftplug.hf.config import config_from_hf

    hf = Gemma4TextConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                          num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8,
                          num_kv_shared_layers=2, use_double_wide_mlp=True, hidden_size_per_layer_input=8,
                          vocab_size_per_layer_input=100,
                          layer_types=["sliding_attention", "full_attention"] * 2).to_dict()
    # sliding layer 0: q 64x64, k and v 64x32, o 64x64 = 12288; full layer 1 (head_dim 32, 1 kv head, values
    # are keys): q 64x128, k 64x32, o 128x64 = 18432; the shared layers 2 and 3 only q and o (8192, 16384)
    # and double-wide MLPs 3x64x192; MLPs 3x64x96; per-layer inputs 1024 a layer and their projection 64x32
    weights = 12288 + 18432 + 8192 + 16384 + 2 * 18432 + 2 * 36864 + 4 * 1024 + 2048
    widths = [64, 128, 64, 128]  # query heads x head_dim: the full layers' own head_dim
    tokens, targets, seq_len = 32, 10, 16
    mixing = 3 * sum(4 * w * seq_len / 2 for w in widths)
    dense = config_from_hf(hf)
    assert update_flops(dense, tokens, targets, seq_len, full=True) == (6 * weights * tokens + mixing * tokens
                                                                        + 6 * 64 * 100 * targets)
    # experts beside each MLP: its router 64x4 and 2 of 4 experts of 3x64x16
    moe = config_from_hf({**hf, "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
                          "moe_intermediate_size": 16})
    weights += 4 * (64 * 4 + 2 * 3 * 64 * 16)
    assert update_flops(moe, tokens, targets, seq_len, full=True) == (6 * weights * tokens + mixing * tokens
                                                                      + 6 * 64 * 100 * targets)
