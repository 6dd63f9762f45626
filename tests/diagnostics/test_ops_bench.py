"""`sftplug bench ops`: every op's PyTorch form timed, every fused form checked against it."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from sftplug import hookimpl
from sftplug.diagnostics.ops_bench import format_table, run_ops_bench
from sftplug.fused import OPS, FusedOp, FusedOpsRequest, pytorch
from sftplug.registry import Registry

SMALL = FusedOpsRequest(device=torch.device("cpu"), dtype=torch.float32, hidden_size=64, intermediate_size=96,
                        head_dim=16, rotary_dim=16, n_heads=4, n_kv_heads=2, vocab_size=100, tokens=32, experts=4,
                        expert_intermediate_size=24, top_k=2, lora_rank=4)


class Off(FusedOp):
    """PyTorch's result times (1 + 1e-3): a form whose difference the bench must see."""

    name = "off"

    def __init__(self, op):
        self.op = op

    def __call__(self, *args):
        out = getattr(pytorch, self.op)(*args)
        if self.op == "cross_entropy":
            return out[0] * (1 + 1e-3), out[1]
        return out * (1 + 1e-3)


class Plugin:
    @hookimpl
    def select_fused_ops(self, request):
        return [Off(op) for op in OPS]


def test_pytorch_is_timed_and_a_fused_form_is_checked_against_it():
    registry = Registry()
    registry.add("off-ops", Plugin)
    seen = []
    rows = run_ops_bench(registry, SMALL, repeats=1, echo=seen.append)
    assert seen == rows and [(r["op"], r["form"]) for r in rows] == [(op, f) for op in OPS for f in ("pytorch", "off")]
    for r in rows:
        if r["form"] == "pytorch":
            assert r["fwd_ms"] > 0 and r["gb_s"] > 0 and r["speedup"] == 1.0 and r["difference"] == 0.0
            assert (r["bwd_ms"] is None) == (r["op"] == "cross_entropy")  # the loss step has no backward
        else:
            assert r["fwd_ms"] is None and r["status"].startswith("checked, not timed")
            assert r["difference"] == pytest.approx(1e-3, rel=1e-2)  # the output, and the gradients through it
    table = format_table(rows)
    assert table.splitlines()[0].split()[:4] == ["op", "form", "sizes", "dtype"]
    assert "cross_entropy off      32 x 100" in table
    assert "grouped_linear" in table and "64 x 64 -> 4 x 48" in table  # top_k rows per token, gate and up


def test_a_dense_model_has_no_grouped_linear_row():
    registry = Registry()
    registry.add("off-ops", Plugin)
    dense = dataclasses.replace(SMALL, experts=0, expert_intermediate_size=0, top_k=0, lora_rank=0)
    rows = run_ops_bench(registry, dense, repeats=1)
    assert [r["op"] for r in rows if r["form"] == "pytorch"] == [op for op in OPS if op != "grouped_linear"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the fused forms are timed, not interpreted")
def test_the_triton_forms_match_pytorch_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "SFTPLUG_NO_ENTRYPOINTS": "1"}
    done = subprocess.run([sys.executable, "-m", "sftplug", "bench", "ops", "--device", "cpu", "--repeats", "1",
                           "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    triton = {r["op"]: r for r in rows if r["form"] == "triton"}
    assert set(triton) == set(OPS)
    for r in triton.values():
        assert r["status"].startswith("checked"), r
        assert r["difference"] < 1e-5, r  # fp32: the same result up to a few roundings
    assert "rmsnorm triton" in done.stderr  # each row reported as it finishes
