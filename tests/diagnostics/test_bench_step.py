"""`sftplug bench step` times sftplug, its variants and HF+PEFT on W0 and reports their ratios."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_step_w0_reports_every_side_and_the_ratios():
    cmd = [sys.executable, "-m", "sftplug", "bench", "step", "--workload", "W0", "--rounds", "1", "--steps", "1",
           "--warmup", "1", "--variant", "workers2", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert list(result["sides"]) == ["sftplug", "sftplug+workers2", "hf+peft"]
    peer = result["sides"]["hf+peft"]
    for side, ratio in result["ratios"].items():
        m = result["sides"][side]
        assert m["tps"] > 0 and m["fwd_ms"] > 0 and m["bwd_ms"] > 0 and m["peak_mem_mib"] > 0
        assert ratio["tps"] == pytest.approx(m["tps"] / peer["tps"])
        assert ratio["memory"] == pytest.approx(m["peak_mem_mib"] / peer["peak_mem_mib"])
    assert result["tps_ratio"] == result["ratios"]["sftplug"]["tps"] and result["errors"] == {}
    progress = [line for line in done.stderr.splitlines() if line.startswith("round 1/1 ")]
    assert [line.split(":")[0] for line in progress] == ["round 1/1 sftplug", "round 1/1 sftplug+workers2",
                                                          "round 1/1 hf+peft"]  # each side as it finishes


def test_a_failing_side_is_reported_and_the_others_still_count(monkeypatch):
    from sftplug.diagnostics import step_bench

    def side(name, *args):
        if name == "sftplug+compile":
            return "sftplug+compile failed: RuntimeError: out of memory"
        return step_bench.SideResult(name, 100.0 if name == "sftplug" else 50.0, 1.0, 2.0, 0.5, 10.0)

    monkeypatch.setattr(step_bench, "run_side_in_child", side)
    result = step_bench.bench_step("W0", rounds=1, variants=("compile",))
    assert list(result["sides"]) == ["sftplug", "hf+peft"] and result["tps_ratio"] == 2.0
    assert result["errors"] == {"sftplug+compile": "sftplug+compile failed: RuntimeError: out of memory"}
    assert "failed: sftplug+compile failed: RuntimeError: out of memory" in step_bench.format_step_table(result)


@pytest.mark.slow
def test_bench_step_exits_1_when_a_side_failed():
    # sftplug's side refuses the unknown backend in its own process; the peer's side still runs and is reported
    cmd = [sys.executable, "-m", "sftplug", "bench", "step", "--workload", "W0", "--rounds", "1", "--steps", "1",
           "--warmup", "0", "--attention", "warp-drive", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert list(result["sides"]) == ["hf+peft"] and result["sides"]["hf+peft"]["tps"] > 0
    assert list(result["errors"]) == ["sftplug"]
    assert "unknown attention backend 'warp-drive'" in result["errors"]["sftplug"]
