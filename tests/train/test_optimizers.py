"""--optimizer: bitsandbytes' 8-bit AdamW trains and resumes bitwise; what cannot run here says so."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sftplug.errors import SftplugError
from sftplug.train.loop import train
from sftplug.train.optimizers import make_optimizer
from sftplug.train.setup import build_run

pytest.importorskip("bitsandbytes")


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_adamw8bit_trains_and_resumes_bitwise(small_config, tmp_path, registry, quiet):
    straight = small_config(out=str(tmp_path / "a"), steps=8, save_every=4, optimizer="adamw8bit")
    train(straight, registry, echo=quiet)
    curve = losses(tmp_path / "a")
    assert sum(curve[-2:]) < sum(curve[:2])
    resumed_out = tmp_path / "b"
    (resumed_out / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-4", resumed_out / "checkpoints" / "step-4")
    train(small_config(out=str(resumed_out), steps=8, save_every=4, optimizer="adamw8bit", resume="auto"), registry,
          echo=quiet)
    assert losses(resumed_out) == curve[4:]
    a, b = (load_file(str(out / "checkpoints/step-8/model.safetensors")) for out in (tmp_path / "a", resumed_out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adamw8bit_keeps_one_byte_per_moment_value(small_config, registry, quiet):
    run = build_run(small_config(optimizer="adamw8bit"), registry, echo=quiet)
    run.update()
    large = [p for p in run.params if p.numel() >= 4096]  # bitsandbytes keeps smaller tensors' state in fp32
    assert large
    for p in large:
        state = run.optimizer.state[p]
        for moment in ("state1", "state2"):
            assert state[moment].dtype == torch.uint8 and state[moment].numel() == p.numel()


def test_changing_the_optimizer_on_resume_is_refused(small_config, tmp_path, registry, quiet):
    train(small_config(steps=2, optimizer="adamw8bit"), registry, echo=quiet)
    with pytest.raises(SftplugError, match="^--optimizer is 'adamw' but .* was trained with 'adamw8bit'"):
        train(small_config(steps=4, resume="auto"), registry, echo=quiet)


@pytest.mark.slow
def test_paged_optimizers_need_a_gpu_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sftplug", "train", "--steps", "1", "--seq-len", "32",
                           "--optimizer", "paged_adamw", "--device", "cpu", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "Error: --optimizer paged_adamw: paged optimizers page their state between GPU and CPU memory; this run "
        "is on cpu: use adamw or adamw8bit")
    assert "Traceback" not in done.stderr


def test_without_bitsandbytes_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    params = [torch.nn.Parameter(torch.zeros(4))]
    hint = r"^--optimizer adamw8bit needs bitsandbytes: pip install 'sftplug\[quantize\]'"
    with pytest.raises(SftplugError, match=hint):
        make_optimizer("adamw8bit", params, 1e-3, 0.0, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="paged optimizers need a CUDA GPU")
@pytest.mark.parametrize("name", ["paged_adamw", "paged_adamw8bit"])
def test_paged_optimizers_train_on_a_gpu(small_config, registry, name, quiet):
    run = build_run(small_config(optimizer=name, device="cuda"), registry, echo=quiet)
    first = run.update()["loss"]
    for _ in range(4):
        last = run.update()["loss"]
    assert last < first
