"""MFU: the model FLOPs of an update, counted by hand for a small model, over the stated peak."""

import pytest
import torch

from sftplug.model.transformer import ModelConfig
from sftplug.train.flops import PEAK_ENV, peak_flops, update_flops

CONFIG = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=12, n_layers=2, n_heads=2, n_kv_heads=1)


def test_update_flops_by_hand():
    # per layer: qkv 8x(8+4+4)=128, o 8x8=64, gate_up+down 3x8x12=288 -> 480 weights, 960 over two layers
    # attention: 4 FLOPs x 8 (heads x head dim) x 16/2 keys x 3 passes x 2 layers = 1536 per token
    tokens, targets, seq_len = 32, 10, 16
    full = 6 * 960 * tokens + 1536 * tokens + 6 * 8 * 100 * targets
    lora = 4 * 960 * tokens + 6 * 50 * tokens + 1536 * tokens + 4 * 8 * 100 * targets
    assert update_flops(CONFIG, tokens, targets, seq_len, full=True) == full
    assert update_flops(CONFIG, tokens, targets, seq_len, full=False, adapter_params=50) == lora


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
