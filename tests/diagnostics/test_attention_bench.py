"""`sftplug bench attention`: forward/backward time and TFLOP/s of every backend, and why not the others."""

import json

import torch
from click.testing import CliRunner

from sftplug.cli import cli
from sftplug.diagnostics.attention_bench import attention_flops, format_table, run_attention_bench


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def test_flops_follow_design_md():
    assert attention_flops(8, 32, 2048, 64) == 4 * 8 * 32 * 2048**2 * 64 * 0.5
    assert attention_flops(8, 32, 2048, 64, causal=False) == 2 * attention_flops(8, 32, 2048, 64)
    doc_ids = torch.tensor([[0] * 3 + [1] * 5])
    assert attention_flops(1, 2, 8, 4, True, doc_ids) == 4 * 2 * (9 + 25) * 4 * 0.5


def test_bench_times_every_usable_backend_and_says_why_not_the_others(registry):
    rows = run_attention_bench(registry, shapes=[(1, 2, 64, 16), (1, 4, 2, 64, 16)],
                               dtypes=["fp32"], device="cpu", repeats=1, packed_shape=(2, 4, 2, 128, 16))
    json.dumps(rows)
    timed = {(r["backend"], r["case"]) for r in rows if r["status"] == "ok"}
    for backend in ("flash", "math"):
        assert {(backend, "B1 H2 S64 D16"), (backend, "B1 H4/2 S64 D16")} <= timed
        assert any(r["backend"] == backend and r["packed"] and r["status"] == "ok" for r in rows)
    for r in rows:
        if r["status"] == "ok":
            assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["fwd_tflops"] > 0 and r["bwd_tflops"] > 0
        else:
            assert r["status"].startswith("skipped: ")
    table = format_table(rows)
    assert "fwd TFLOP/s" in table and "fastest forward+backward per case" in table and "not timed:" in table


def test_bench_respects_its_time_budget(registry):
    rows = run_attention_bench(registry, shapes=[(1, 2, 32, 16)], dtypes=["fp32"],
                               device="cpu", repeats=1, packed=False, budget_s=0)
    assert rows and all(r["status"] != "ok" for r in rows)
    assert any("time budget" in r["status"] for r in rows)


def test_bench_attention_command():
    result = invoke("bench", "attention", "--json", "--device", "cpu", "--shape", "1,2,32,16", "--repeats", "1",
                       "--no-packed")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {r["backend"] for r in rows if r["status"] == "ok"} >= {"flash", "math"}
    table = invoke("bench", "attention", "--device", "cpu", "--shape", "1x2x32x16", "--repeats", "1",
                      "--no-packed")
    assert table.exit_code == 0 and "fwd ms" in table.output
    bad = invoke("bench", "attention", "--shape", "1,2,3")
    assert bad.exit_code == 2 and "--shape takes B,H,S,D" in bad.output
