"""Choosing an attention backend out loud; shell overrides that cannot steer it."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch.profiler import profile

import sftplug
from sftplug import probes
from sftplug.attention import AttentionBackend, AttentionRequest
from sftplug.attention.choice import attention_skipped, choose_backend, steering_env, steering_notes
from sftplug.errors import SftplugError
from sftplug.registry import Registry, build_registry

CPU_ONLY = not torch.cuda.is_available()
FLASH_CPU_OP = "aten::_scaled_dot_product_flash_attention_for_cpu"
MATH_OP = "aten::_scaled_dot_product_attention_math"


def request(name="auto", packed=False, device="cpu"):
    return AttentionRequest(name, torch.device(device), torch.float32, 64, 8, 2, packed)


class Fake(AttentionBackend):
    def __init__(self, name, priority=0, answer=None, packed_documents=True, raises=False):
        self.name, self.priority, self.answer = name, priority, answer
        self.packed_documents, self.raises = packed_documents, raises

    @sftplug.hookimpl
    def select_attention(self, request):
        return self

    def check(self, request):
        if self.raises:
            raise ValueError("probe exploded")
        return self.answer


def registry_of(*backends) -> Registry:
    registry = Registry()
    for backend in backends:
        registry.add(backend.name, lambda b=backend: b, source="test")
    return registry


# -- the choice ---------------------------------------------------------------------------


def test_auto_takes_the_fastest_usable_and_says_why():
    registry = registry_of(Fake("slow", 1), Fake("fast", 50, answer="needs a bigger GPU"), Fake("mid", 10))
    choice = choose_backend(registry.hook, request())
    assert choice.backend.name == "mid"
    assert choice.why_chosen.startswith("mid (auto: the fastest that runs fp32, head dim 64, 8/2 heads on cpu")
    assert "usable in order: mid > slow" in choice.why_chosen and "not usable: fast" in choice.why_chosen
    assert choice.rejected == {"fast": "needs a bigger GPU"}


def test_a_third_party_backend_wins_auto_by_declaring_itself_best():
    registry = build_registry(entrypoints=False)
    registry.add("warp", lambda: Fake("warp", 1000), source="warp-attention 1.0")
    assert choose_backend(registry.hook, request()).backend.name == "warp"


def test_math_is_never_chosen_silently():
    registry = registry_of(Fake("math", 0), Fake("flash", 30, answer="flash needs fp16/bf16"))
    choice = choose_backend(registry.hook, request())
    assert choice.backend.name == "math" and "slow reference kernel" in choice.why_chosen


def test_unknown_backend_names_the_known_and_the_usable(registry):
    with pytest.raises(SftplugError) as err:
        choose_backend(registry.hook, request("warp-drive"), attention_skipped(registry))
    message = str(err.value)
    assert message.startswith("unknown attention backend 'warp-drive'; known: ")
    assert "math" in message and "(or auto)" in message and "usable here: " in message


@pytest.mark.skipif(not CPU_ONLY, reason="describes a CPU-only machine")
def test_unavailable_backend_says_why_and_what_works_here(registry):
    with pytest.raises(SftplugError) as err:
        choose_backend(registry.hook, request("efficient"), attention_skipped(registry))
    assert str(err.value) == (
        "attention backend 'efficient' is unavailable: efficient attention runs only on CUDA GPUs; "
        f"this torch build is CPU-only (torch {torch.__version__}); usable here: chunked, flash, math"
    )


def test_a_backend_whose_check_fails_says_why_and_what_works():
    registry = registry_of(Fake("fussy", 9, answer="fussy needs fp16/bf16"), Fake("plain", 1))
    with pytest.raises(SftplugError, match=r"^attention backend 'fussy' cannot run fp32, head dim 64, 8/2 heads on "
                                           r"cpu: fussy needs fp16/bf16; usable here: plain$"):
        choose_backend(registry.hook, request("fussy"))


def test_a_backend_that_cannot_keep_documents_apart_is_refused_for_packed_rows():
    registry = registry_of(Fake("blind", 99, packed_documents=False), Fake("careful", 1))
    assert choose_backend(registry.hook, request()).backend.name == "blind"
    choice = choose_backend(registry.hook, request(packed=True))
    assert choice.backend.name == "careful"
    assert "cannot keep packed documents apart" in choice.rejected["blind"]
    with pytest.raises(SftplugError, match="blind cannot keep packed documents apart.*--no-pack"):
        choose_backend(registry.hook, request("blind", packed=True))


class Declares(Fake):
    sliding_window = softcap = custom_scale = sinks = True


@pytest.mark.parametrize("option, missing", [
    (dict(window=4096), "a sliding window (4096 keys)"),
    (dict(softcap=50.0), "soft-capped scores (cap 50)"),
    (dict(scale=0.0625), "a softmax scale of 0.0625"),
    (dict(sinks=True), "attention sinks (a learned logit per head in the softmax's denominator)"),
], ids=["window", "softcap", "scale", "sinks"])
def test_a_backend_that_does_not_declare_an_option_is_unavailable_saying_why(option, missing):
    registry = registry_of(Fake("plain", 99), Declares("capable", 1))
    asked = AttentionRequest("auto", torch.device("cpu"), torch.float32, 64, 8, 2, **option)
    choice = choose_backend(registry.hook, asked)
    assert choice.backend.name == "capable"
    assert choice.rejected == {"plain": f"plain cannot apply {missing}, which this model's attention uses"}
    assert choose_backend(registry.hook, AttentionRequest("auto", torch.device("cpu"), torch.float32, 64, 8, 2)
                          ).backend.name == "plain"  # without the option it leads again
    with pytest.raises(SftplugError, match="^attention backend 'plain' cannot run .*plain cannot apply"):
        choose_backend(registry.hook, AttentionRequest("plain", torch.device("cpu"), torch.float32, 64, 8, 2,
                                                       **option))


@pytest.mark.skipif(not CPU_ONLY, reason="describes a CPU-only machine")
def test_the_cpu_machine_runs_windows_and_softcaps_in_chunked_and_says_why_not_the_others(registry):
    asked = AttentionRequest("auto", torch.device("cpu"), torch.float32, 64, 8, 2, True, 512, window=256,
                             softcap=50.0, scale=0.3)
    choice = choose_backend(registry.hook, asked, attention_skipped(registry))
    assert choice.backend.name == "chunked" and "usable in order: chunked;" in choice.why_chosen
    assert "sliding window 256, soft-cap 50" in choice.why_chosen
    assert set(choice.rejected) == {"flash", "math"}  # flex is skipped on the CPU (no backward there)


def test_a_crashing_check_makes_the_backend_unavailable_not_a_crash():
    registry = registry_of(Fake("shaky", 99, raises=True), Fake("solid", 1))
    choice = choose_backend(registry.hook, request())
    assert choice.backend.name == "solid"
    assert choice.rejected["shaky"] == "its check raised ValueError: probe exploded"


def test_nothing_usable_says_why_of_each():
    registry = registry_of(Fake("a", answer="needs A"), Fake("b", answer="needs B"))
    with pytest.raises(SftplugError, match=r"^no attention backend can run .*a: needs A; b: needs B; gone: broken$"):
        choose_backend(registry.hook, request(), {"gone": "broken"})


@pytest.mark.skipif(not CPU_ONLY, reason="describes a CPU-only machine")
def test_the_cpu_machine_offers_chunked_then_flash_then_math(registry):
    by_name = {p.name: p for p in registry.plugins}
    assert by_name["chunked"].available and by_name["flash"].available and by_name["math"].available
    for name in ("efficient", "cudnn"):
        assert not by_name[name].available and "runs only on CUDA GPUs" in by_name[name].why_unavailable
    choice = choose_backend(registry.hook, request())
    assert choice.backend.name == "chunked" and "usable in order: chunked > flash > math" in choice.why_chosen
    choice = choose_backend(registry.hook, request(packed=True))
    assert choice.backend.name == "flash" and "usable in order: flash > chunked > math" in choice.why_chosen


def tiny_data(tmp_path, n=24, text=False):
    """The first n default records; as plain text there is no sample prompt to generate for."""
    src = (sftplug.config.ASSETS / "default_train.jsonl").read_text().splitlines()[:n]
    if text:
        records = (json.loads(line) for line in src)
        src = [json.dumps({"text": f"{r['prompt']} {r['completion']}"}) for r in records]
    path = tmp_path / "tiny.jsonl"
    path.write_text("\n".join(src) + "\n")
    return str(path)


def test_cli_refuses_an_unusable_backend_in_one_line_with_exit_2(tmp_path):
    from sftplug.cli import cli

    args = ["train", "--attention", "efficient", "--device", "cpu", "--full", "--steps", "1", "--seq-len", "32",
            "--micro-bsz", "2", "--data", tiny_data(tmp_path), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1
    assert "attention backend 'efficient'" in errors[0] and "runs only on CUDA GPUs" in errors[0]
    assert errors[0].endswith("usable here: chunked, flash, math")


# -- shell overrides ------------------------------------------------------------------------


def test_steering_variables_are_found():
    env = {
        "PYTORCH_SDP_KERNEL": "math", "SDPA_BACKEND": "math", "TORCH_CUDNN_SDPA_ENABLED": "1",
        "FLASH_ATTENTION_DISABLE": "1", "ATTN_BACKEND": "xformers", "PATH": "/bin", "SFTPLUG_X": "1",
    }
    found = steering_env(env)
    assert set(found) == {"PYTORCH_SDP_KERNEL", "SDPA_BACKEND", "TORCH_CUDNN_SDPA_ENABLED",
                          "FLASH_ATTENTION_DISABLE", "ATTN_BACKEND"}
    assert steering_notes({"PYTORCH_SDP_KERNEL": "math"}) == [
        "PYTORCH_SDP_KERNEL=math found and ignored: attention runs only in the chosen kernel "
        "(sdpa_kernel([backend]) around every call)"
    ]


@pytest.mark.parametrize("attention", ["auto", "flash", "chunked"])
def test_a_run_reports_overrides_and_still_runs_the_chosen_kernel(small_config, monkeypatch, tmp_path, attention,
                                                                  registry):
    expected = "flash" if attention == "auto" else attention  # auto's pick for packed fp32 rows on the CPU
    """PYTORCH_SDP_KERNEL=math (and a script that acted on it by switching flash off
    globally) must not push training onto the math kernel: the profiler shows which ran."""
    from sftplug.train.loop import train
    from sftplug.train.run import Run

    monkeypatch.setenv("PYTORCH_SDP_KERNEL", "math")
    monkeypatch.setenv("SDPA_BACKEND", "math")
    ops: set[str] = set()
    real_update = Run.update

    def profiled_update(run, **options):  # the training steps only (not the sample generation)
        with profile() as prof:
            record = real_update(run, **options)
        ops.update(e.name for e in prof.events())
        return record

    monkeypatch.setattr(Run, "update", profiled_update)
    flags = probes.sdpa_global_flags()
    torch.backends.cuda.enable_flash_sdp(False)
    lines = []
    try:
        config = small_config(steps=1, attention=attention, data=tiny_data(tmp_path, 48, text=True), full=True,
                              device="cpu")  # the CPU flash kernel's op names, on any machine
        train(config, registry, echo=lines.append)
    finally:
        torch.backends.cuda.enable_flash_sdp(flags["flash"])
    header = "\n".join(lines)
    assert f"attention: {expected} (" in header
    assert "PYTORCH_SDP_KERNEL=math" in header and "SDPA_BACKEND=math" in header
    if expected == "flash":
        assert FLASH_CPU_OP in ops and FLASH_CPU_OP + "_backward" in ops
    else:  # sftplug's own batched matmuls, no SDPA kernel at all
        assert "aten::bmm" in ops and FLASH_CPU_OP not in ops
    assert MATH_OP not in ops
