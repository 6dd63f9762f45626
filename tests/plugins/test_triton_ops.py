"""The `triton-ops` fused forms train like PyTorch's (CPU: through the Triton interpreter)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sftplug.config import DEFAULT_DATA

pytest.importorskip("triton")

pytestmark = pytest.mark.slow  # every test here starts a process
ARGS = ["train", "--steps", "3", "--seq-len", "48", "--micro-bsz", "2", "--log-every", "1", "--warmup", "1"]


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def train(out, *args, **env):
    # a few plain-text records: the interpreter is slow, and text has no sample prompt to answer
    data = out.parent / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"Count from {i} to {i + 5}: " + ", ".join(map(str, range(i, i + 6)))})
                            + "\n" for i in range(8)))
    full_env = {**os.environ, "SFTPLUG_NO_ENTRYPOINTS": "1", **env}
    done = subprocess.run([sys.executable, "-m", "sftplug", *ARGS, "--data", str(data), "--out", str(out), *args],
                          capture_output=True, text=True, env=full_env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the interpreter is not used")
def test_every_op_fused_trains_like_pytorch_under_the_interpreter(tmp_path):
    # full fine-tuning: every kernel's gradients, the norms' weight gradients included (the kernel
    # tests cover the frozen norms of LoRA)
    extra = ["--full"]
    header = train(tmp_path / "fused", "--fused", "all", *extra, TRITON_INTERPRET="1")
    assert "fused ops: rmsnorm, glu, rope, cross_entropy: triton (requested)" in header
    train(tmp_path / "pytorch", "--fused", "none", *extra)
    fused, unfused = losses(tmp_path / "fused"), losses(tmp_path / "pytorch")
    assert len(fused) == 3
    # fp32 throughout: the same sums in another order, a few roundings apart after 3 updates
    assert fused == pytest.approx(unfused, rel=1e-5)


def test_auto_keeps_pytorch_on_the_cpu_and_says_why(tmp_path):
    header = train(tmp_path / "auto", "--steps", "1", TRITON_INTERPRET="1")
    assert ("fused ops: rmsnorm, glu, rope, cross_entropy: pytorch (auto: no fused form is faster here "
            "(triton: the CPU interpreter is for tests))") in header


def test_without_a_gpu_or_the_interpreter_the_plugin_says_why(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "sftplug", "plugins", "--json"], capture_output=True, text=True,
                          env=env)
    ops = next(p for p in json.loads(done.stdout) if p["name"] == "triton-ops")
    assert ops["hooks"] == ["select_fused_ops"]
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        assert ops["available"]
        return
    assert not ops["available"] and "no CUDA GPU" in ops["reason"]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:8]))
    done = subprocess.run([sys.executable, "-m", "sftplug", *ARGS, "--data", str(data), "--out", str(tmp_path / "r"),
                           "--fused", "rope=triton"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--fused rope=triton: no fused form 'triton' of rope is offered (offered: none; plugin triton-ops is " \
           "unavailable: no CUDA GPU" in done.stderr
