"""How --fused chooses the form of each op: auto takes only what is faster here, a request
takes what it names or fails in one line, and the chosen forms are what the model computes with."""

import dataclasses

import pytest
import torch

from sftplug import hookimpl
from sftplug.config import TrainConfig
from sftplug.errors import SftplugError
from sftplug.fused import OPS, FusedOp, FusedOpsRequest, Priority, pytorch
from sftplug.fused.choice import PYTORCH, attach_fused, choose_fused_ops, parse_fused
from sftplug.registry import Registry

REQUEST = FusedOpsRequest(device=torch.device("cpu"), dtype=torch.float32, hidden_size=64, intermediate_size=96,
                          head_dim=16, rotary_dim=16, n_heads=4, n_kv_heads=2, vocab_size=100, tokens=32)
MOE = dataclasses.replace(REQUEST, experts=4, expert_intermediate_size=24, top_k=2)
DENSE_OPS = [op for op in OPS if op != "grouped_linear"]  # what a model without experts computes


class Form(FusedOp):
    """A form that computes PyTorch's result and counts its calls."""

    def __init__(self, op, name, priority=0, answer=None):
        self.op, self.name, self.priority, self.answer, self.calls = op, name, priority, answer, 0

    def priority_for(self, request):
        return Priority(self.priority, f"{self.priority} says the test")

    def check(self, request):
        return self.answer

    def __call__(self, *args):
        self.calls += 1
        return getattr(pytorch, self.op)(*args)


class Plugin:
    def __init__(self, *forms):
        self.forms = list(forms)

    @hookimpl
    def select_fused_ops(self, request):
        return self.forms


def registry_with(*forms) -> Registry:
    registry = Registry()
    registry.add("fake-ops", lambda: Plugin(*forms))
    return registry


def test_auto_takes_a_form_only_where_it_is_faster_and_can_run():
    fast = Form("rmsnorm", "fast", priority=20)
    slow = Form("glu", "slow", priority=-1)
    broken = Form("rope", "broken", priority=50, answer="broken cannot rotate here")
    choice = choose_fused_ops(registry_with(fast, slow, broken).hook, REQUEST, "auto")
    assert choice.forms == {"rmsnorm": "fast", "glu": PYTORCH, "rope": PYTORCH, "cross_entropy": PYTORCH,
                            "grouped_linear": PYTORCH}
    assert choice.ops.rmsnorm is fast and choice.ops.glu is pytorch.glu
    assert choice.why_chosen["rmsnorm"] == "auto: 20 says the test"
    assert "no fused form is faster here (slow: -1 says the test)" in choice.why_chosen["glu"]
    assert choice.why_chosen["rope"] == "auto: broken: broken cannot rotate here"
    assert choice.rejected["rope"] == {"broken": "broken cannot rotate here"}
    assert choice.fused == ["rmsnorm"]
    assert choice.describe().startswith("rmsnorm: fast (auto: 20 says the test); glu: pytorch (auto: no fused")


def test_the_highest_priority_wins_among_forms_of_one_op():
    low, high = Form("rmsnorm", "low", priority=5), Form("rmsnorm", "high", priority=9)
    assert choose_fused_ops(registry_with(low, high).hook, REQUEST, "auto").forms["rmsnorm"] == "high"


def test_none_and_compile_keep_pytorch_everywhere():
    registry = registry_with(Form("rmsnorm", "fast", priority=20))
    for choice in (choose_fused_ops(registry.hook, REQUEST, "none"),
                   choose_fused_ops(registry.hook, REQUEST, "auto", compiled=True)):
        assert set(choice.forms.values()) == {PYTORCH} and choice.ops == type(choice.ops)()
    with pytest.raises(SftplugError, match="with --compile: torch.compile fuses these ops itself"):
        choose_fused_ops(registry.hook, REQUEST, "rmsnorm", compiled=True)


def test_requested_ops_are_fused_even_when_slower_and_the_rest_stay_pytorch():
    slow = Form("glu", "slow", priority=-1)
    choice = choose_fused_ops(registry_with(slow).hook, REQUEST, "glu")
    assert choice.forms == {"rmsnorm": PYTORCH, "glu": "slow", "rope": PYTORCH, "cross_entropy": PYTORCH,
                            "grouped_linear": PYTORCH}
    assert choice.why_chosen["glu"] == "requested" and choice.why_chosen["rmsnorm"] == "not requested"


def test_all_needs_every_op_and_says_which_cannot_be_fused():
    forms = [Form(op, "f") for op in OPS if op != "rope"] + [Form("rope", "f", answer="f needs even heads")]
    with pytest.raises(SftplugError) as info:
        choose_fused_ops(registry_with(*forms).hook, REQUEST, "all")
    assert str(info.value) == ("--fused all: no fused rope runs fp32 on cpu: f: f needs even heads; "
                               "use --fused auto or none")
    everything = choose_fused_ops(registry_with(*[Form(op, "f") for op in OPS]).hook, MOE, "all")
    assert everything.fused == list(OPS)


def test_a_dense_model_does_not_use_grouped_linear_whatever_is_asked():
    # no form of it is needed: --fused all on a dense model is what it was before experts
    registry = registry_with(*[Form(op, "f") for op in DENSE_OPS])
    for fused in ("all", "auto", "grouped_linear", "rmsnorm,grouped_linear=f"):
        choice = choose_fused_ops(registry.hook, REQUEST, fused)
        assert choice.forms["grouped_linear"] == PYTORCH and choice.why_chosen["grouped_linear"] == "not used"
    assert choose_fused_ops(registry.hook, REQUEST, "all").describe() == (
        "rmsnorm, glu, rope, cross_entropy: f (requested); grouped_linear: pytorch (not used)")
    with pytest.raises(SftplugError, match="no fused grouped_linear runs fp32 on cpu"):
        choose_fused_ops(registry.hook, MOE, "all")  # a mixture of experts needs one


def test_a_named_form_is_taken_or_refused_in_one_line():
    a, b = Form("rmsnorm", "a", priority=9), Form("rmsnorm", "b", priority=1, answer="b needs a GPU")
    hook = registry_with(a, b).hook
    with pytest.raises(SftplugError, match=r"^--fused rmsnorm=c: no fused form 'c' of rmsnorm is offered "
                                           r"\(offered: a, b\)$"):
        choose_fused_ops(hook, REQUEST, "rmsnorm=c")
    with pytest.raises(SftplugError, match="^--fused rmsnorm=b: b cannot compute rmsnorm for fp32 on cpu: b needs "
                                           "a GPU; usable here: a$"):
        choose_fused_ops(hook, REQUEST, "rmsnorm=b")
    assert choose_fused_ops(hook, REQUEST, "rmsnorm=a").ops.rmsnorm is a


def test_a_check_that_raises_makes_the_form_unavailable_not_a_crash():
    class Raises(Form):
        def check(self, request):
            raise RuntimeError("probe crashed")

    choice = choose_fused_ops(registry_with(Raises("glu", "raises", priority=9)).hook, REQUEST, "auto")
    assert choice.forms["glu"] == PYTORCH and choice.rejected["glu"] == {"raises": "its check raised RuntimeError: "
                                                                                    "probe crashed"}


@pytest.mark.parametrize("value,message", [
    ("rmsnorm,swiglu", "unknown op 'swiglu'; give auto, none, all, or ops among rmsnorm, glu, rope, cross_entropy"),
    ("rope,rope=triton", "rope is given twice"),
    ("", "unknown op ''"),
])
def test_bad_fused_values_are_refused_by_the_config(value, message):
    with pytest.raises(SftplugError, match=message):
        TrainConfig(fused=value)
    assert parse_fused("rmsnorm, rope=triton") == {"rmsnorm": None, "rope": "triton"}


def test_the_model_computes_with_the_chosen_forms():
    from sftplug.model.transformer import ModelConfig, Transformer

    model = Transformer(ModelConfig.preset("tiny"))
    model.init_weights(0)
    model.set_attention(plain_attention)
    ids = torch.randint(0, 1024, (2, 10))
    before = model(ids)
    forms = [Form(op, "count", priority=1) for op in OPS]
    choice = attach_fused(model, registry_with(*forms), REQUEST, "auto")
    assert choice.fused == DENSE_OPS
    after = model(ids)
    assert torch.equal(after, before)  # the same PyTorch computation, through the forms
    n = len(model.layers)
    assert [f.calls for f in forms[:3]] == [2 * n + 1, n, n]  # rmsnorm, glu, rope


def plain_attention(q, k, v, causal=True, doc_ids=None):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
