"""The `chunked` CPU attention against a float64 reference; its memory bound; when auto takes it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sftplug.attention import AttentionRequest
from sftplug.attention.choice import choose_backend
from sftplug.config import DEFAULT_DATA
from sftplug.kernels.attention import attention_reference
from sftplug.kernels.chunked_attention import chunked_attention
from sftplug.plugins.chunked import FASTER_UP_TO, chunked

B, T, D = 2, 40, 32  # T not a multiple of the chunks below
DOC_LENGTHS = [[7, 13, 1, 19], [40]]


def inputs(hq, hkv, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(B, h, T, D, generator=g).requires_grad_()  # noqa: E731
    return make(hq), make(hkv), make(hkv), torch.randn(B, hq, T, D, generator=g)


def doc_ids_for(lengths):
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths])


def grads(fn, q, k, v, grad):
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v)
    out.backward(grad.to(out.dtype))
    return out.detach(), q.grad.detach(), k.grad.detach(), v.grad.detach()


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 2)], ids=["mha", "gqa4:2", "gqa8:2"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_backend_matches_float64_reference(causal, heads, packed):
    q, k, v, grad = inputs(*heads)
    doc_ids = doc_ids_for(DOC_LENGTHS) if packed else None
    got = grads(lambda *x: chunked(*x, causal=causal, doc_ids=doc_ids), q, k, v, grad)
    want = grads(lambda *x: attention_reference(*(t.double() for t in x), causal=causal, doc_ids=doc_ids),
                 q, k, v, grad.double())
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=0, msg=what)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_every_chunk_length_gives_the_same_packed_attention(chunk, causal):
    q, k, v, grad = inputs(8, 2, seed=1)
    doc_ids = doc_ids_for(DOC_LENGTHS)
    got = grads(lambda *x: chunked_attention(*x, causal=causal, chunk=chunk, doc_ids=doc_ids), q, k, v, grad)
    want = grads(lambda *x: attention_reference(*x, causal=causal, doc_ids=doc_ids), q, k, v, grad)
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=what)


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_products_stay_one_chunk_of_scores_and_never_repeat_kv(monkeypatch, packed):
    chunk, hq = 8, 8
    largest, batches = [], set()
    real_bmm = torch.bmm

    def spy(a, b, **kwargs):
        out = real_bmm(a, b, **kwargs)
        largest.append(out.numel())
        batches.add(out.shape[0])
        return out

    monkeypatch.setattr(torch, "bmm", spy)
    q, k, v, grad = inputs(hq, 2)
    doc_ids = doc_ids_for(DOC_LENGTHS) if packed else None
    chunked_attention(q, k, v, chunk=chunk, doc_ids=doc_ids).backward(grad)
    assert max(largest) <= B * hq * chunk * T < B * hq * T * T // 4
    assert batches == {B * 2}  # one product per kv head: the 4 query heads of a group share it


def test_it_runs_fp32_on_the_cpu_and_says_why_not_elsewhere():
    def request(device="cpu", dtype=torch.float32):
        return AttentionRequest("chunked", torch.device(device), dtype, 64, 8, 2)

    assert chunked.check(request()) is None
    why_not_bf16 = chunked.check(request(dtype=torch.bfloat16))
    assert why_not_bf16 == "chunked attention computes in fp32 only, not bf16 (flash runs that)"
    assert "runs on the CPU only" in chunked.check(request(device="cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes a CPU-only machine")
def test_auto_takes_chunked_for_fp32_rows_on_the_cpu_and_flash_for_packed_long_or_bf16(registry):
    hook = registry.hook

    def auto(dtype=torch.float32, seq_len=512, packed=False):
        request = AttentionRequest("auto", torch.device("cpu"), dtype, 64, 8, 4, packed, seq_len)
        return choose_backend(hook, request)

    assert auto().backend.name == "chunked" and "usable in order: chunked > flash > math" in auto().why_chosen
    assert auto(seq_len=FASTER_UP_TO + 1).backend.name == "flash"
    assert auto(packed=True).backend.name == "flash"
    assert auto(dtype=torch.bfloat16).backend.name == "flash"


@pytest.mark.slow
def test_training_with_chunked_matches_flash(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:16]))  # packed rows

    def losses(attention):
        out = tmp_path / attention
        subprocess.run([sys.executable, "-m", "sftplug", "train", "--steps", "3", "--seq-len", "64", "--micro-bsz",
                        "2", "--log-every", "1", "--data", str(data), "--out", str(out), "--attention", attention,
                        "--sample-prompt", "Hi", "--device", "cpu"], check=True, capture_output=True)
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert losses("chunked") == pytest.approx(losses("flash"), rel=1e-5)


# -- sliding windows, soft-capped scores, a custom scale ---------------------------------------


def options_reference(q, k, v, causal=True, doc_ids=None, window=0, softcap=0.0, scale=None):
    """Float64 attention with every option spelled out: scores, soft-cap, causal + window + document masks."""
    q, k, v = (x.double() for x in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) if causal else torch.ones(T, T, dtype=torch.bool)
    if window:
        allowed = allowed & (j > i - window)
    allowed = allowed[None, None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


OPTIONS = {  # windows shorter than T, crossing the documents of DOC_LENGTHS (7, 13, 1, 19)
    "window": dict(window=9),
    "window1": dict(window=1),
    "packed-window": dict(window=9, packed=True),
    "softcap-large-scores": dict(softcap=50.0, scale=0.3, loud=4.0),  # scores well past the cap
    "all": dict(window=6, softcap=30.0, scale=0.3, packed=True, loud=4.0),
}


@pytest.mark.parametrize("chunk", [None, 7], ids=["auto-chunk", "chunk7"])
@pytest.mark.parametrize("case", list(OPTIONS))
def test_window_softcap_and_scale_match_float64_reference(case, chunk):
    options = dict(OPTIONS[case])
    packed, loud = options.pop("packed", False), options.pop("loud", 1.0)
    q, k, v, grad = inputs(8, 2, seed=2)
    with torch.no_grad():
        q.mul_(loud), k.mul_(loud)
    doc_ids = doc_ids_for(DOC_LENGTHS) if packed else None
    if options.get("softcap"):
        raw = (q @ k.repeat_interleave(4, 1).transpose(-2, -1) * options["scale"]).abs().max()
        assert raw > 2 * options["softcap"]  # the cap bites
    if chunk is None:
        got = grads(lambda *x: chunked(*x, causal=True, doc_ids=doc_ids, **options), q, k, v, grad)
    else:
        got = grads(lambda *x: chunked_attention(*x, chunk=chunk, doc_ids=doc_ids, **options), q, k, v, grad)
    want = grads(lambda *x: options_reference(*x, doc_ids=doc_ids, **options), q, k, v, grad.double())
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        scale = max(b.abs().max().item(), 1.0)
        torch.testing.assert_close(a.double() / scale, b.double() / scale, atol=1e-5, rtol=0, msg=what)


def test_a_window_skips_the_keys_before_it(monkeypatch):
    chunk, window = 8, 5
    widths = []
    real_bmm = torch.bmm

    def spy(a, b, **kwargs):
        if b.shape[-2] == D:  # q k^T or dO v^T: [rows, D] @ [D, keys]
            widths.append(b.shape[-1])
        return real_bmm(a, b, **kwargs)

    monkeypatch.setattr(torch, "bmm", spy)
    q, k, v, grad = inputs(4, 2)
    chunked_attention(q, k, v, chunk=chunk, window=window).backward(grad)
    assert max(widths) <= chunk + window - 1 < T


def test_a_window_is_causal_only():
    q, k, v, _ = inputs(4, 4)
    with pytest.raises(ValueError, match="sliding window is causal"):
        chunked(q, k, v, causal=False, window=4)


def test_chunked_declares_every_option_and_auto_takes_it_for_them_on_the_cpu(registry):
    assert chunked.sliding_window and chunked.softcap and chunked.custom_scale
    request = AttentionRequest("auto", torch.device("cpu"), torch.float32, 64, 8, 2, True, 512, window=256,
                               softcap=50.0, scale=0.3)
    choice = choose_backend(registry.hook, request)
    assert choice.backend.name == "chunked"
    uses = "which this model's attention uses"
    assert choice.rejected["flash"] == f"flash cannot apply a sliding window (256 keys), {uses}"
    assert choice.rejected["math"] == f"math cannot apply soft-capped scores (cap 50), {uses}"
