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


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below covers this on a GPU")
def test_triton_training_matches_flash_under_the_interpreter(tmp_path):
    header = run(tmp_path / "triton", "triton", TRITON_INTERPRET="1")
    assert "attention: triton (requested" in header
    run(tmp_path / "flash", "flash")
    assert losses(tmp_path / "triton") == pytest.approx(losses(tmp_path / "flash"), rel=1e-5)


@pytest.mark.slow
def test_triton_is_listed_saying_why_when_unavailable():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "sftplug", "plugins", "--json"], capture_output=True, text=True,
                          env=env)
    triton = next(p for p in json.loads(done.stdout) if p["name"] == "triton")
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        assert triton["available"]
    else:
        assert not triton["available"] and triton["reason"]


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_training_matches_flash_on_the_gpu(tmp_path):
    for name in ("triton", "flash"):
        subprocess.run([sys.executable, "-m", "sftplug", "train", "--model", "w1", "--dtype", "bf16", "--steps", "20",
                        "--seq-len", "2048", "--micro-bsz", "8", "--attention", name, "--out", str(tmp_path / name),
                        "--sample-prompt", "Hi"], check=True)
    assert losses(tmp_path / "triton") == pytest.approx(losses(tmp_path / "flash"), rel=2e-2)


def test_the_first_run_must_match_the_reference_before_triton_is_offered(monkeypatch):
    import sftplug.kernels.attention as kernel
    from sftplug.plugins.triton_attention import first_run

    def broken(q, k, v, causal=True):
        return kernel.attention_reference(q, k, v, causal=causal) * 1.5  # a miscompiled kernel

    def crashing(q, k, v, causal=True):
        raise RuntimeError("ptxas fatal: out of resources")

    check = first_run.__wrapped__  # uncached
    monkeypatch.setattr(kernel, "triton_attention", kernel.attention_reference)
    assert check("cpu", torch.float32, 32) is None
    monkeypatch.setattr(kernel, "triton_attention", broken)
    assert check("cpu", torch.float16, 32).startswith(
        "triton attention's first run for fp16, head dim 32 on cpu is wrong: output off by")
    monkeypatch.setattr(kernel, "triton_attention", crashing)
    assert check("cpu", torch.float32, 64) == ("triton attention failed its first run for fp32, head dim 64 on cpu: "
                                               "RuntimeError: ptxas fatal: out of resources")


def test_auto_leaves_head_dim_256_on_hopper_to_flash(monkeypatch):
    from sftplug import probes
    from sftplug.attention import AttentionRequest
    from sftplug.plugins.sdpa import flash
    from sftplug.plugins.triton_attention import triton

    def request(head_dim, packed=True):
        return AttentionRequest("auto", torch.device("cuda"), torch.bfloat16, head_dim, 32, 8, packed)

    monkeypatch.setattr(probes, "gpu_capability", lambda: (9, 0))
    monkeypatch.setattr("sftplug.plugins.sdpa.gpu_generation", lambda device: "sm90+")
    def priority(backend, head_dim):
        return backend.priority_for(request(head_dim)).value

    assert priority(triton, 128) > priority(flash, 128)  # packed rows: triton first
    assert priority(triton, 256) < priority(flash, 256)  # no wgmma tile at D=256
    monkeypatch.setattr(probes, "gpu_capability", lambda: (8, 0))
    assert priority(triton, 256) > priority(flash, 256)  # Ampere: mma.sync everywhere


def test_the_first_run_covers_the_window_softcap_and_sinks_a_request_has(monkeypatch):
    import sftplug.kernels.attention as kernel
    from sftplug.plugins.triton_attention import first_run

    def ignoring_options(q, k, v, causal=True, **options):  # a kernel that drops the window, the cap, the sinks
        return kernel.attention_reference(q, k, v, causal=causal)

    check = first_run.__wrapped__  # uncached
    monkeypatch.setattr(kernel, "triton_attention", ignoring_options)
    assert check("cpu", torch.float32, 32) is None
    assert check("cpu", torch.float32, 32, window=True).startswith(
        "triton attention's first run for fp32, head dim 32, sliding window on cpu is wrong: output off by")
    assert check("cpu", torch.float32, 32, softcap=True).startswith(
        "triton attention's first run for fp32, head dim 32, soft-capped on cpu is wrong: output off by")
    assert check("cpu", torch.float32, 32, sinks=True).startswith(
        "triton attention's first run for fp32, head dim 32, sinks on cpu is wrong: output off by")
    monkeypatch.setattr(kernel, "triton_attention", kernel.attention_reference)
    assert check("cpu", torch.float32, 32, window=True, softcap=True, sinks=True) is None


def test_windows_softcaps_scales_and_sinks_reach_the_kernel(monkeypatch):
    import sftplug.kernels.attention as kernel
    import sftplug.plugins.triton_attention as plugin
    from sftplug.attention import AttentionRequest
    from sftplug.attention.choice import _missing_option

    request = AttentionRequest("triton", torch.device("cuda"), torch.bfloat16, 128, 32, 8, window=4096, softcap=50.0,
                               scale=0.1, sinks=True)
    assert _missing_option(plugin.triton, request) is None  # declared: never refused for them
    first_runs = []
    monkeypatch.setattr(plugin, "first_run", lambda *args, **kw: first_runs.append((args, kw)))
    assert plugin.triton.check(request) is None
    assert first_runs == [(("cuda", torch.bfloat16, 128), {"window": True, "softcap": True, "sinks": True})]

    passed = {}
    monkeypatch.setattr(kernel, "triton_attention", lambda q, k, v, **options: passed.update(options) or q)
    q = torch.zeros(1, 2, 4, 16)
    sinks = torch.zeros(2)
    plugin.triton(q, q, q, causal=True, window=5, softcap=30.0, scale=0.25, sinks=sinks)
    assert passed == {"causal": True, "doc_ids": None, "window": 5, "softcap": 30.0, "scale": 0.25, "sinks": sinks}
