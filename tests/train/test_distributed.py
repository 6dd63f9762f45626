"""torchrun with 2 CPU processes (gloo) trains exactly like one process with the same global batch."""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sftplug.checkpoint import folders
from sftplug.config import DEFAULT_DATA

FIRST_UPDATE = Path(__file__).with_name("first_update.py")
COMMON = ["--steps", "4", "--seq-len", "64", "--log-every", "1", "--sample-prompt", "Hi", "--accum", "2"]


def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:200]))
    return path


def single(out, data, *extra):
    cmd = [sys.executable, "-m", "sftplug", "train", "--out", str(out), "--data", str(data), *COMMON, *extra]
    subprocess.run(cmd, check=True, capture_output=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def two_processes(out, data, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(),
           "-m", "sftplug", "train", "--out", str(out), "--data", str(data), *COMMON, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def first_update(out, data, nproc, *options):
    """The loss and (full) gradients of the first update of a run in ``nproc`` processes."""
    result = out.with_suffix(".pt")
    script = [str(FIRST_UPDATE), str(out), str(data), str(result), *options]
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", free_port()]
    done = subprocess.run([sys.executable, *(launch if nproc > 1 else []), *script], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(result, weights_only=True)


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out, step=4):
    return folders.load_weights(out / "checkpoints" / f"step-{step}")


NO_BITSANDBYTES = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode", [[], ["--full"], ["--full", "--strategy", "fsdp"],
             pytest.param(["--quantize", "nf4", "--strategy", "fsdp"], marks=NO_BITSANDBYTES)],
    ids=["ddp-lora", "ddp-full", "fsdp-full", "fsdp-qlora"]
)
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, mode):
    data = data_file(tmp_path)
    base = ["--full", "1"] if "--full" in mode else []
    base += ["--quantize", "nf4"] if "nf4" in mode else []  # the 4-bit base, sharded as its packed bytes
    strategy = ["--strategy", "fsdp"] if "fsdp" in mode else []
    single(tmp_path / "one", data, "--micro-bsz", "4", *[m for m in mode if m not in ("--strategy", "fsdp")])
    output = two_processes(tmp_path / "two", data, "--micro-bsz", "2", *mode)
    assert output.count("precision:") == 1 and output.count("done:") == 1  # only rank 0 prints
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-6)
    # rank 0 answers the sample prompt as one process does; a sharded model does not answer
    answers = [json.loads((tmp_path / run / "summary.json").read_text())["answer_after"] for run in ("one", "two")]
    assert answers[1] == (None if "fsdp" in mode else answers[0]) and answers[0]
    # Equal gradients of the first update, before the optimizer. (Not the weights after Adam:
    # it divides by sqrt(v), which turns rounding-level differences of near-zero gradient
    # entries into steps of up to lr, different on every CPU.) Two processes add the same
    # per-token terms in another order: fp32 rounding of sums over ~10^3 tokens, about
    # sqrt(N) * eps ~ 1e-6 of a tensor's largest entry. A wrong gradient (a rank's tokens
    # missing, a wrong world-size scale) is off by 10% or more; 1e-4 sits between the two.
    one = first_update(tmp_path / "grads-one", data, 1, "--micro-bsz", "4", *base)
    two = first_update(tmp_path / "grads-two", data, 2, "--micro-bsz", "2", *base, *strategy)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["grads"].keys() == one["grads"].keys() and one["grads"]
    for name, grad in one["grads"].items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode", [["--lora-dropout", "0.1"], ["--full", "--strategy", "fsdp"]], ids=["ddp-lora", "fsdp-full"]
)
def test_resume_in_two_processes(tmp_path, mode):
    data = data_file(tmp_path)
    two_processes(tmp_path / "a", data, "--micro-bsz", "2", "--save-every", "2", *mode)
    resumed = tmp_path / "b"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    two_processes(resumed, data, "--micro-bsz", "2", "--save-every", "2", *mode, "--resume", "auto")
    assert losses(resumed) == losses(tmp_path / "a")[2:]
    a, b = weights(tmp_path / "a"), weights(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_fsdp_checkpoints_are_sharded_and_export_to_one_hf_folder(tmp_path):
    data = data_file(tmp_path)
    out = tmp_path / "run"
    two_processes(out, data, "--micro-bsz", "2", "--full", "--strategy", "fsdp")
    folder = out / "checkpoints" / "step-4"
    shards = sorted(p.name for p in (folder / folders.SHARDS).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per rank, nothing gathered
    assert not (folder / folders.WEIGHTS).exists()
    manifest = folders.verify(folder)
    assert set(manifest["files"]) == {"state.pt"} | {f"shards/{name}" for name in shards}

    # No process group here: export reassembles full tensors from the shards.
    exported = tmp_path / "hf"
    export = [sys.executable, "-m", "sftplug", "export", str(out), "--out", str(exported)]
    subprocess.run(export, check=True, capture_output=True)
    from transformers import AutoModelForCausalLM

    from sftplug.loading import load_model

    trained = load_model(str(folder)).model.eval()
    hf = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, trained(ids), rtol=1e-4, atol=1e-4)

    # A damaged shard is caught by the manifest before anything is read.
    victim = folder / folders.SHARDS / "__1_0.distcp"
    victim.write_bytes(victim.read_bytes()[:-10])
    done = subprocess.run([sys.executable, "-m", "sftplug", "export", str(out), "--out", str(tmp_path / "hf2")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "__1_0.distcp: truncated" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_nproc_starts_torchrun_and_a_bad_input_ends_every_process_in_one_line(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "hi", "completion": "there"}\nnot json\n')
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sftplug", "train", "--nproc", "2", "--out", str(out), "--data", str(data)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"process 0 of 2: {data}:2: invalid JSON" in done.stderr
    assert "Error: process 0 of 2 failed (exit code 2)" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.slow
def test_a_killed_process_ends_the_run_and_keeps_the_last_checkpoint(tmp_path):
    data, out = data_file(tmp_path), tmp_path / "run"
    cmd = [sys.executable, "-m", "sftplug", "train", "--nproc", "2", "--out", str(out), "--data", str(data),
           "--seq-len", "64", "--steps", "100000", "--save-every", "2", "--eval-every", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    victim = worker_pid(proc.pid, rank=1)
    os.kill(victim, signal.SIGKILL)  # as the kernel's OOM killer would
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "Error: process 1 of 2 failed (killed by SIGKILL)" in stderr
    assert "process 0 of 2: stopped: another process of this run failed" in stderr
    assert "Traceback" not in stdout + stderr
    kept = folders.resolve(out)
    folders.verify(kept)  # complete; nothing half-written took its place
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def worker_pid(launcher: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=rank among the launcher's children."""
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher}")


def test_more_processes_than_gpus_is_one_clear_error(monkeypatch):
    from sftplug import distributed
    from sftplug.errors import SftplugError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SftplugError, match=r"local rank 1 has no GPU of its own \(this machine has 1\)"):
        distributed.init_world("cuda")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [[], ["--strategy", "fsdp"]], ids=["ddp", "fsdp"])
def test_a_mixture_of_experts_in_two_processes_equals_one(tmp_path, strategy, make_hf_folder):
    """Full fine-tuning with the load-balancing loss (a mean over micro-batches and ranks): one process's 4
    micro-batches of 2 rows are the two ranks' 2 each, so loss, aux loss and gradients agree."""
    data, model = data_file(tmp_path), tmp_path / "moe"
    make_hf_folder(model, config_class="Qwen3MoeConfig", num_experts=8, num_experts_per_tok=2,
                   moe_intermediate_size=32, head_dim=16, router_aux_loss_coef=0.1)
    options = ["--model", str(model), "--micro-bsz", "2", "--full", "1"]
    one = first_update(tmp_path / "one", data, 1, *options, "--accum", "4")
    two = first_update(tmp_path / "two", data, 2, *options, "--accum", "2", *strategy)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["grads"].keys() == one["grads"].keys() and any("experts" in name for name in one["grads"])
    for name, grad in one["grads"].items():  # as in test_two_processes_equal_one_with_the_same_global_batch
        scale = float(grad.abs().max())
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-4 * scale, msg=name)
