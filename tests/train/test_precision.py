"""--dtype auto: bf16 on a GPU that runs it, else fp32; the run header says which and why."""

import torch

from sftplug import probes
from sftplug.train.precision import resolve_dtype


def test_auto_is_fp32_on_the_cpu_and_bf16_on_a_bf16_gpu(monkeypatch):
    assert resolve_dtype("auto", torch.device("cpu")) == ("fp32", "--dtype auto: fp32 on the CPU")
    monkeypatch.setattr(probes, "bf16_supported", lambda device: True)
    assert resolve_dtype("auto", torch.device("cuda")) == ("bf16", "--dtype auto: this GPU runs bf16")
    monkeypatch.setattr(probes, "bf16_supported", lambda device: False)
    assert resolve_dtype("auto", torch.device("cuda")) == ("fp32", "--dtype auto: fp32 on cuda without bf16")
    assert resolve_dtype("fp16", torch.device("cpu")) == ("fp16", "")  # a dtype asked for is taken as it is


def test_the_run_header_says_which_and_why(small_config, registry):
    from sftplug.train.setup import build_run

    lines = []
    run = build_run(small_config(steps=1), registry, echo=lines.append)
    assert run.precision.name == "fp32" and run.precision.autocast_dtype is None
    assert any(line.startswith("precision: fp32 (--dtype auto: fp32 on the CPU); attention: ") for line in lines)
