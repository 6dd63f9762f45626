"""The `triton` backend trains like SDPA flash (CPU: through the Triton interpreter)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sftplug.config import DEFAULT_DATA

ARGS = ["train", "--steps", "2", "--seq-len", "48", "--micro-bsz", "2", "--log-every", "1", "--warmup", "1",
        "--sample-prompt", "Hi"]


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def run(out, attention, **env):
    # a few records, no held-out set: the interpreter is slow, and packed rows exercise doc_ids
    data = out.parent / "data.jsonl"
    data.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:8]))
    full_env = {**os.environ, "SFTPLUG_NO_ENTRYPOINTS": "1", **env}
    done = subprocess.run([sys.executable, "-m", "sftplug", *ARGS, "--data", str(data), "--out", str(out),
                           "--attention", attention],
                          capture_output=True, text=True, env=full_env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below covers this on a GPU")
def test_triton_training_matches_flash_under_the_interpreter(tmp_path):
    header = run(tmp_path / "triton", "triton", TRITON_INTERPRET="1")
    assert "attention: triton (requested" in header
    run(tmp_path / "flash", "flash")
    assert losses(tmp_path / "triton") == pytest.approx(losses(tmp_path / "flash"), rel=1e-5)


def test_triton_is_listed_with_a_reason_when_unavailable():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "sftplug", "plugins", "--json"], capture_output=True, text=True,
                          env=env)
    triton = next(p for p in json.loads(done.stdout) if p["name"] == "triton")
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        assert triton["available"]
    else:
        assert not triton["available"] and triton["reason"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_training_matches_flash_on_the_gpu(tmp_path):
    for name in ("triton", "flash"):
        subprocess.run([sys.executable, "-m", "sftplug", "train", "--model", "w1", "--dtype", "bf16", "--steps", "20",
                        "--seq-len", "2048", "--micro-bsz", "8", "--attention", name, "--out", str(tmp_path / name),
                        "--sample-prompt", "Hi"], check=True)
    assert losses(tmp_path / "triton") == pytest.approx(losses(tmp_path / "flash"), rel=2e-2)
