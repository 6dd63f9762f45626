"""Choosing the gated delta rule's backend: auto takes the fastest that runs, a name takes that
one or fails in one line naming what is usable; a run checks --linear-attention before loading."""

import pytest
import torch

from sftplug.config import TrainConfig
from sftplug.errors import SftplugError
from sftplug.linear_attention.backend import LinearAttentionBackend, LinearAttentionRequest
from sftplug.linear_attention.choice import choose_linear_attention
from sftplug.offers import Priority
from sftplug.train.choices import check_choices


def request(name="auto", device="cpu"):
    return LinearAttentionRequest(name, torch.device(device), torch.float32, 2, 4, 16, 8, packed=True)


def test_auto_takes_the_pytorch_form_on_the_cpu_and_says_why(registry):
    choice = choose_linear_attention(registry.hook, request())
    assert choice.backend.name == "pytorch"
    assert choice.why_chosen.startswith("pytorch (auto: the fastest that runs fp32, 2/4 heads of 16/8, packed rows")


def test_an_unknown_backend_is_refused_naming_the_known_ones(registry):
    with pytest.raises(SftplugError, match=r"^--linear-attention nope: no such backend; known: .*pytorch.* \(or "
                                           r"auto\); usable here: .*pytorch"):
        choose_linear_attention(registry.hook, request("nope"))


def test_a_backend_that_cannot_run_the_request_is_refused_with_its_reason(registry):
    class GpuOnly(LinearAttentionBackend):
        name, priority = "gpu-only", 50

        def check(self, request):
            return "runs on CUDA GPUs only"

        def priority_for(self, request):
            return Priority(50, "measured faster")

    class Plugin:
        from sftplug import hookimpl

        @hookimpl
        def select_linear_attention(self, request):
            return [GpuOnly()]

    registry.pm.register(Plugin(), name="gpu-only-test")
    try:
        assert choose_linear_attention(registry.hook, request()).backend.name == "pytorch"  # auto passes it over
        with pytest.raises(SftplugError, match="^--linear-attention gpu-only cannot run fp32, .* on cpu: runs on "
                                               "CUDA GPUs only; usable here: pytorch$"):
            choose_linear_attention(registry.hook, request("gpu-only"))
    finally:
        registry.pm.unregister(name="gpu-only-test")


def test_a_run_refuses_an_unknown_backend_before_loading_anything(registry, tmp_path):
    config = TrainConfig(out=str(tmp_path / "run"), linear_attention="nope", eval_data=None)
    with pytest.raises(SftplugError, match="^--linear-attention nope: no such backend"):
        check_choices(config, registry, torch.device("cpu"), torch.float32)
