"""A run killed at any moment (SIGKILL, even mid-save) resumes to the same final weights."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # every test here starts a process

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


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_skips_the_end_of_run_work_and_exits_128_plus_its_number(tmp_path, reference, sig, code):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "SFTPLUG_NO_PLOT"}  # a finished run would draw its plot
    proc = subprocess.Popen(command(out), stdout=subprocess.PIPE, text=True, env=env)
    wait_for_step(proc, 3)
    proc.send_signal(sig)
    rest = proc.stdout.read()
    assert proc.wait() == code
    step = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 3 <= step < 10
    assert f"interrupted: saved {out / 'checkpoints' / f'step-{step}'} at step {step}; resume with the same " \
           "command plus --resume auto" in rest
    # no held-out loss after, sample answers after, summary lines or plot
    end_of_run = ("held-out loss:", "done:", "plot:", "sample prompt:")
    assert not any(line.startswith(end_of_run) for line in rest.splitlines())
    assert not (out / "plot.png").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["signal"] == sig.name and summary["steps"] == step
    assert summary["eval_loss_after"] is None and summary["answer_after"] is None
    subprocess.run(command(out, "--resume", "auto"), check=True, capture_output=True)
    got = final(out)
    for name in got:
        assert torch.equal(got[name], reference[name]), name


def test_ctrl_c_on_nproc_saves_and_exits_130_without_a_traceback(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sftplug", "train", "--nproc", "2", "--out", str(out), *ARGS]
    # a terminal's Ctrl-C reaches the whole foreground process group: the launcher and both processes
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_step(proc, 3)
    os.killpg(proc.pid, signal.SIGINT)
    rest, errors = proc.communicate(timeout=120)
    assert proc.returncode == 130, errors[-3000:]
    assert "interrupted: saved" in rest and "Traceback" not in rest + errors
    assert (out / "checkpoints" / "latest").exists()
