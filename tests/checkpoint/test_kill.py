"""A run killed at any moment (SIGKILL, even mid-save) resumes to the same final weights."""

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--steps", "10", "--save-every", "2", "--micro-bsz", "2", "--seq-len", "64", "--lora-dropout", "0.1",
        "--accum", "2", "--log-every", "1", "--sample-prompt", "Hi"]


def command(out, *extra):
    return [sys.executable, "-m", "sftplug", "train", "--out", str(out), *ARGS, *extra]


def final(out):
    return load_file(str(out / "checkpoints" / "step-10" / "model.safetensors"))


def wait_for_step(proc, step):
    """Read the child's output until it reports `step`."""
    for line in proc.stdout:
        if line.startswith(f"step {step:>2}/10"):
            return
    raise AssertionError("the run ended before the kill point")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    subprocess.run(command(out), check=True, capture_output=True)
    return final(out)


@pytest.mark.parametrize("kill_after_step, delay", [(1, 0.0), (4, 0.05), (6, 0.0), (8, 0.01)])
def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path, reference, kill_after_step, delay):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out), stdout=subprocess.PIPE, text=True)
    wait_for_step(proc, kill_after_step)
    time.sleep(delay)  # even steps: the kill lands while the checkpoint is being written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(command(out, "--resume", "auto"), check=True, capture_output=True)
    got = final(out)
    assert got.keys() == reference.keys()
    for name in got:
        assert torch.equal(got[name], reference[name]), name
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert all(not name.startswith(".latest") for name in leftovers)


def test_sigint_saves_and_exits_cleanly(tmp_path, reference):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out), stdout=subprocess.PIPE, text=True)
    wait_for_step(proc, 3)
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait() == 0
    assert "interrupted: saved" in rest and "--resume auto" in rest
    step = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 3 <= step < 10
    subprocess.run(command(out, "--resume", "auto"), check=True, capture_output=True)
    got = final(out)
    for name in got:
        assert torch.equal(got[name], reference[name]), name
