"""The `flex` backend (PyTorch FlexAttention) against a float64 reference: causal, packed documents,
sliding windows, soft-capped scores, a custom scale and GQA, forward and every gradient; where it is
offered and where auto takes it.

PyTorch's CPU FlexAttention refuses backward in its Python wrapper (inference only); on the CPU the
gradient tests lift that one check so that its eager reference path (which has a backward) runs the
block masks and score_mod this backend builds. On a GPU the compiled kernels run as in training.
"""

from __future__ import annotations

import pytest
import torch

from sftplug.attention import AttentionRequest
from sftplug.attention.choice import attention_skipped, choose_backend
from sftplug.errors import SftplugError
from sftplug.plugins import flex_attention as flex_plugin
from sftplug.plugins.flex_attention import flex

flex_api = pytest.importorskip("torch.nn.attention.flex_attention")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, T, D = 2, 40, 32  # T not a multiple of the 128 block
DOC_LENGTHS = [[7, 13, 1, 19], [40]]


@pytest.fixture(autouse=True)
def cpu_backward(monkeypatch):
    if DEVICE.type == "cpu":  # see the module docstring
        monkeypatch.setattr(flex_api, "_validate_device", lambda query, key, value: None)


def reference(q, k, v, causal=True, doc_ids=None, window=0, softcap=0.0, scale=None):
    """Float64 attention with every option spelled out: scores, soft-cap, causal + window + document masks."""
    q, k, v = (x.double() for x in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    i, j = torch.arange(T, device=q.device)[:, None], torch.arange(T, device=q.device)[None, :]
    allowed = (j <= i) if causal else torch.ones(T, T, dtype=torch.bool, device=q.device)
    if window:
        allowed = allowed & (j > i - window)
    allowed = allowed[None, None]
    if doc_ids is not None:
        docs = doc_ids.to(q.device)
        allowed = allowed & (docs[:, None, :, None] == docs[:, None, None, :])
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


def doc_ids_for(lengths):  # on the host, as the backend receives them (host_doc_ids)
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths])


def inputs(hq, hkv, loud=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h, s=1.0: (torch.randn(B, h, T, D, generator=g) * s).to(DEVICE).requires_grad_()  # noqa: E731
    return make(hq, loud), make(hkv, loud), make(hkv), torch.randn(B, hq, T, D, generator=g).to(DEVICE)


def grads(fn, q, k, v, grad):
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v)
    out.backward(grad.to(out.dtype))
    return out.detach(), q.grad.detach(), k.grad.detach(), v.grad.detach()


CASES = {  # windows shorter than T, crossing the documents of DOC_LENGTHS (7, 13, 1, 19)
    "packed": dict(heads=(4, 4), packed=True),
    "full-packed": dict(heads=(4, 2), packed=True, causal=False),
    "window-gqa": dict(window=9),
    "all": dict(window=6, softcap=30.0, scale=0.3, packed=True, loud=4.0),  # scores well past the cap
    "softcap50": dict(softcap=50.0, scale=0.3, loud=5.0),
}
TOL = 1e-5 if DEVICE.type == "cpu" else 5e-3  # fp32; a GPU may multiply in TF32


@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_float64_reference(case):
    options = dict(CASES[case])
    heads, packed, loud = options.pop("heads", (8, 2)), options.pop("packed", False), options.pop("loud", 1.0)
    causal = options.pop("causal", True)
    q, k, v, grad = inputs(*heads, loud=loud)
    doc_ids = doc_ids_for(DOC_LENGTHS) if packed else None
    if options.get("softcap"):
        scores = q.detach() @ k.detach().repeat_interleave(heads[0] // heads[1], 1).transpose(-2, -1)
        assert (scores * options["scale"]).abs().max() > 2 * options["softcap"]  # the cap bites
    got = grads(lambda *x: flex(*x, causal=causal, doc_ids=doc_ids, **options), q, k, v, grad)
    want = grads(lambda *x: reference(*x, causal=causal, doc_ids=doc_ids, **options), q, k, v, grad.double())
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        scale = max(b.abs().max().item(), 1.0)
        torch.testing.assert_close(a.double() / scale, b.double() / scale, atol=TOL, rtol=0, msg=f"{case} {what}")


def test_one_block_mask_per_batch_and_per_row_shape():
    doc_ids = doc_ids_for(DOC_LENGTHS)
    first = flex_plugin.block_mask(doc_ids, T, True, 9, DEVICE)
    assert flex_plugin.block_mask(doc_ids, T, True, 9, DEVICE) is first  # every layer of a forward
    assert flex_plugin.block_mask(doc_ids.clone(), T, True, 9, DEVICE) is not first  # the next batch
    one_each = doc_ids_for([[40], [40]])
    rows = flex_plugin.block_mask(one_each, T, True, 9, DEVICE)
    assert rows is flex_plugin.block_mask(None, T, True, 9, DEVICE)  # no document mask needed
    assert flex_plugin.block_mask(None, T, False, 0, DEVICE) is None  # every key visible


def test_a_window_is_causal_only():
    q, k, v, _ = inputs(4, 4)
    with pytest.raises(ValueError, match="sliding window is causal"):
        flex(q, k, v, causal=False, window=4)


def test_it_declares_every_option_and_leads_auto_only_on_a_gpu_for_windows_and_softcaps():
    assert flex.sliding_window and flex.softcap and flex.custom_scale and flex.sinks and flex.packed_documents

    def priority(device="cuda", **options):
        request = AttentionRequest("auto", torch.device(device), torch.bfloat16, 64, 8, 2, **options)
        return flex.priority_for(request).value

    assert priority(window=4096) == priority(softcap=50.0) == flex_plugin.PRIORITY_WITH_OPTIONS
    assert priority(window=4096) > 40  # above triton's packed-rows priority, cuDNN's and flash's
    assert priority() < 20 and priority(packed=True) < 20  # below flash, cuDNN and efficient
    assert priority("cpu", window=4096) < 20


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes a CPU-only machine")
def test_on_the_cpu_it_is_not_offered_and_says_why(registry):
    why_unavailable = flex.why_unavailable()
    assert why_unavailable.startswith("flex attention trains on CUDA GPUs only: PyTorch's CPU FlexAttention has no "
                                      "backward")
    cpu = AttentionRequest("flex", torch.device("cpu"), torch.float32, D, 8, 2)
    assert flex.check(cpu).startswith(why_unavailable[:40])
    by_name = {p.name: p for p in registry.plugins}
    assert not by_name["flex"].available and by_name["flex"].why_unavailable == why_unavailable
    request = AttentionRequest("flex", torch.device("cpu"), torch.float32, D, 8, 2, window=9)
    with pytest.raises(SftplugError, match=r"^attention backend 'flex' is unavailable: flex attention trains on CUDA"):
        choose_backend(registry.hook, request, attention_skipped(registry))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_auto_takes_it_for_windows_after_its_first_run(registry):
    request = AttentionRequest("auto", DEVICE, torch.bfloat16, 64, 8, 2, True, 1024, window=256, softcap=50.0)
    assert flex.check(request) is None  # the compiled first run matched PyTorch
    assert choose_backend(registry.hook, request).backend.name == "flex"


SINK_CASES = {
    "rows-gqa": dict(),
    "packed-window": dict(packed=True, window=6),
    "full-packed": dict(packed=True, causal=False, heads=(4, 4)),
    "softcap-scale": dict(softcap=30.0, scale=0.3, loud=4.0),
}


@pytest.mark.parametrize("case", list(SINK_CASES))
def test_sinks_match_the_float64_reference_through_flex_lse(case):
    from sftplug.kernels.attention import attention_reference

    options = dict(SINK_CASES[case])
    heads, packed, loud = options.pop("heads", (8, 2)), options.pop("packed", False), options.pop("loud", 1.0)
    q, k, v, grad = inputs(*heads, loud=loud, seed=3)
    sinks = (torch.randn(heads[0], generator=torch.Generator().manual_seed(4)) * 2).to(DEVICE).requires_grad_()
    doc_ids = doc_ids_for(DOC_LENGTHS) if packed else None

    def with_grads(fn, cast):
        x = [t.detach().to(cast).requires_grad_() for t in (q, k, v, sinks)]
        out = fn(*x[:3], sinks=x[3], doc_ids=doc_ids, **options)
        return [out, *torch.autograd.grad(out, x, grad.to(cast))]

    got = with_grads(flex, torch.float32)
    want = with_grads(attention_reference, torch.float64)
    for what, a, b in zip(("out", "dq", "dk", "dv", "dsinks"), got, want):
        scale = max(b.abs().max().item(), 1.0)
        torch.testing.assert_close(a.double() / scale, b / scale, atol=TOL, rtol=0, msg=f"{case} {what}")


def test_the_first_run_checks_the_sinks_and_their_gradient(monkeypatch):
    check = flex_plugin.first_run.__wrapped__  # uncached
    assert check(str(DEVICE), torch.float32, 32, True, False, sinks=True) is None
    monkeypatch.setattr(flex_plugin, "with_sinks", lambda out, lse, sinks: out + 0 * sinks.sum())  # sinks ignored
    assert check(str(DEVICE), torch.float32, 32, True, False, sinks=True).startswith(
        f"flex attention's first run on {DEVICE} (fp32, head dim 32, sinks) differs from PyTorch: out off by")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_sinks_pass_the_first_run(registry):
    request = AttentionRequest("flex", DEVICE, torch.bfloat16, 64, 8, 2, True, 1024, window=128, sinks=True)
    assert flex.check(request) is None
    assert choose_backend(registry.hook, request).backend.name == "flex"
