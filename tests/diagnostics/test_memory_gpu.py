"""benchmarks/memory_gpu.py, the prepared GPU memory run: the same code on the CPU at the tiny
shape (each mode in its own process, one JSON line each), and its device-initialized loader."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "memory_gpu.py"

pytest.importorskip("bitsandbytes")


@pytest.mark.slow
def test_each_mode_runs_in_its_own_process_and_reports_a_line(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--device", "cpu", "--shapes", "tiny",
                           "--modes", "lora,qlora-offload-ckpt", "--steps", "1"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "memory.jsonl").read_text().splitlines()]
    assert [(r["shape"], r["mode"]) for r in lines] == [("tiny", "lora"), ("tiny", "qlora-offload-ckpt")]
    for record in lines:
        assert "error" not in record, record
        assert record["tokens_per_s"] > 0 and record["predicted_peak_gib"] > 0
        assert torch.isfinite(torch.tensor(record["loss"]))


def test_the_8b_loader_writes_its_random_weights_on_the_device(monkeypatch):
    spec = importlib.util.spec_from_file_location("memory_gpu", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    small = dict(script.LLAMA_8B, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4, n_kv_heads=2,
                 vocab_size=1024)
    monkeypatch.setattr(script, "LLAMA_8B", small)
    loader = script.DeviceInitialized()
    assert loader.load_state("tiny", torch.float32, torch.device("cpu")) is None
    model = loader.load_state("llama-8b", torch.float32, torch.device("cpu")).model
    weights = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in weights.values())
    assert torch.equal(weights["norm.weight"], torch.ones(64))
    assert 0.015 < float(weights["layers.0.attn.qkv.weight"].std()) < 0.025  # N(0, 0.02) over 12,288 values
