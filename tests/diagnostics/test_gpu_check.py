"""benchmarks/gpu_check.sh, the prepared GPU run: on a machine without a GPU it gets through
its preflight and skips every GPU step in one line each (so the script itself has no syntax
or path error when a GPU is finally lent)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # every test here starts a process

ROOT = Path(__file__).resolve().parents[2]
GPU_STEPS = ("doctor", "kernels", "attention", "ops", "compare", "syncs", "bench-step", "linear-attention",
             "bench-step-moe")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs for minutes: run it by hand")
def test_the_gpu_script_runs_its_preflight_and_skips_the_gpu_steps_here(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    checkout = entries()
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert entries() == checkout  # nothing written into the package's folders (it once linked kernels/kernels)
    lines = (tmp_path / "steps.txt").read_text().splitlines()
    assert lines[0].startswith("[preflight] ok in ")
    assert lines[1:] == [f"[{name}] skipped: no CUDA GPU on this machine" for name in GPU_STEPS]
    assert '"torch": "' in (tmp_path / "versions.json").read_text()


def entries():
    return sorted(p for folder in ("sftplug", "plugins", "kernels") for p in (ROOT / folder).iterdir()
                  if p.name != "__pycache__")
