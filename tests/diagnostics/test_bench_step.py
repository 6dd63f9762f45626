"""`sftplug bench step` times sftplug, its variants and HF+PEFT on W0 and reports their ratios."""

import json
import subprocess
import sys

import pytest


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
    assert result["tps_ratio"] == result["ratios"]["sftplug"]["tps"]
