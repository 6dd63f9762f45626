"""The Triton attention kernel on the CPU, under the Triton interpreter.

Forward and every gradient are compared with a float64 plain-PyTorch reference: the
kernel's error may be at most twice the error of the same-dtype PyTorch implementation
(plus a small floor). Shapes are tiny: the interpreter runs each program in Python.
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

import sftplug.kernels.attention as attention_module  # noqa: E402
from sftplug.kernels.attention import (  # noqa: E402
    attention_reference,
    triton_attention,
    triton_attention_available,
)

pytestmark = pytest.mark.interpreted


NAMES = ("out", "dq", "dk", "dv")


def _inputs(B, HQ, HKV, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, T, D, generator=g)
    k = torch.randn(B, HKV, T, D, generator=g)
    v = torch.randn(B, HKV, T, D, generator=g)
    do = torch.randn(B, HQ, T, D, generator=g)
    return q, k, v, do


CASES = [
    # B, Hq, Hkv, T, D, causal, dtype
    (1, 2, 1, 1, 32, True, torch.float32),
    (1, 2, 1, 1, 64, False, torch.float16),
    (2, 4, 1, 17, 32, True, torch.float32),
    (1, 8, 2, 17, 64, False, torch.float16),
    (1, 8, 2, 17, 16, True, torch.float16),
    (1, 8, 2, 40, 32, True, torch.float32),
    (1, 2, 2, 97, 32, True, torch.float16),
    (1, 4, 1, 97, 64, False, torch.float32),
    (1, 2, 1, 130, 64, True, torch.float32),
    (1, 2, 2, 130, 32, False, torch.float16),
]


@pytest.mark.parametrize("B,HQ,HKV,T,D,causal,dtype", CASES)
def test_matches_reference(B, HQ, HKV, T, D, causal, dtype, grads_of, assert_close_to_float64):
    q, k, v, do = _inputs(B, HQ, HKV, T, D, seed=T * 31 + D)
    got = grads_of(triton_attention, (q, k, v), do, dtype, causal=causal)
    ref64 = grads_of(attention_reference, (q, k, v), do, torch.float64, causal=causal)
    same = grads_of(attention_reference, (q, k, v), do, dtype, causal=causal)
    assert_close_to_float64(got, ref64, same, dtype, f"T={T} D={D} {HQ}:{HKV} causal={causal}", NAMES)


def test_custom_scale(grads_of, assert_close_to_float64):
    q, k, v, do = _inputs(1, 4, 2, 23, 32, seed=5)
    got = grads_of(triton_attention, (q, k, v), do, torch.float32, causal=True, scale=0.3)
    ref64 = grads_of(attention_reference, (q, k, v), do, torch.float64, causal=True, scale=0.3)
    same = grads_of(attention_reference, (q, k, v), do, torch.float32, causal=True, scale=0.3)
    assert_close_to_float64(got, ref64, same, torch.float32, "scale=0.3", NAMES)


@pytest.mark.parametrize("split", [2, 4])
def test_gqa_group_split_across_programs(split, monkeypatch, grads_of, assert_close_to_float64):
    # On a GPU with few kv heads and a small batch the dK/dV kernel splits each group's
    # query heads over several programs and adds fp32 partial sums; force that here.
    monkeypatch.setattr(attention_module, "_dkdv_split", lambda *args: split)
    q, k, v, do = _inputs(1, 8, 2, 37, 32, seed=split)
    doc_ids = _doc_ids([20, 17])[None]
    got = grads_of(triton_attention, (q, k, v), do, torch.float32, causal=True, doc_ids=doc_ids)
    ref64 = grads_of(attention_reference, (q, k, v), do, torch.float64, causal=True, doc_ids=doc_ids)
    same = grads_of(attention_reference, (q, k, v), do, torch.float32, causal=True, doc_ids=doc_ids)
    assert_close_to_float64(got, ref64, same, torch.float32, f"split={split}", NAMES)


def _doc_ids(lengths, pad_before=0, pad_after=0):
    ids = [-1] * pad_before
    for i, n in enumerate(lengths):
        ids += [i] * n
    return torch.tensor(ids + [-1] * pad_after)


@pytest.fixture
def against_reference(grads_of, assert_close_to_float64):
    """``check(inputs, do, dtype, what, score_bound=0, **options)``: the kernel's output and gradients
    against float64. ``score_bound``: the largest |score| the softmax sees, when it is large."""

    def check(inputs, do, dtype, what, score_bound=0.0, **options):
        got = grads_of(triton_attention, inputs, do, dtype, **options)
        ref64 = grads_of(attention_reference, inputs, do, torch.float64, **options)
        same = grads_of(attention_reference, inputs, do, dtype, **options)
        if not score_bound:
            assert_close_to_float64(got, ref64, same, dtype, what, NAMES)
            return
        # Large scores: the backward recomputes P from the stored log-sum-exp (log2 units), whose
        # rounding, eps * |score| * log2(e) relative, the PyTorch form (it keeps P) does not have.
        floor = (16 if dtype == torch.float32 else 1) + 2 * score_bound * math.log2(math.e)
        for name, a, r, same_dtype in zip(NAMES, got, ref64, same):
            err = (a.double() - r).abs().max().item()
            base = (same_dtype.double() - r).abs().max().item()
            allowed = 2 * base + floor * torch.finfo(dtype).eps * max(1.0, r.abs().max().item())
            assert torch.isfinite(a).all() and err <= allowed, f"{what} {name}: error {err:.3g} > {allowed:.3g}"

    return check


WINDOW_CASES = [
    # window, dtype, document lengths (None: one per row), Hq, Hkv; T = 97
    (1, torch.float32, None, 2, 1),
    (5, torch.float16, [40, 57], 4, 2),
    (16, torch.float32, [7, 50, 30], 4, 2),  # a document shorter than the window, then padding
    (40, torch.float16, None, 2, 2),
    (40, torch.float32, [3, 60, 34], 2, 1),  # the window crosses both document boundaries
]


@pytest.mark.parametrize("window,dtype,lengths,HQ,HKV", WINDOW_CASES)
def test_sliding_window(window, dtype, lengths, HQ, HKV, against_reference):
    T = 97
    q, k, v, do = _inputs(1, HQ, HKV, T, 32, seed=window)
    doc_ids = None if lengths is None else _doc_ids(lengths, pad_after=T - sum(lengths))[None]
    against_reference((q, k, v), do, dtype, f"window={window} docs={lengths} {HQ}:{HKV}",
                      causal=True, window=window, doc_ids=doc_ids)


def test_window_ranges_match_the_mask():
    # The host's ranges, row by row and key by key, are the reference's mask.
    T, window = 53, 6
    doc_ids = torch.stack([_doc_ids([2, 20, 25], pad_before=3, pad_after=3), _doc_ids([53])])
    ranges = attention_module._doc_ranges(doc_ids, T, True, window)
    allowed = attention_module._allowed_mask(T, "cpu", True, doc_ids, window)[:, 0]  # [B, T, T]
    pos = torch.arange(T)
    q_lo, q_hi, k_lo, k_hi = ranges.unbind(1)  # each [B, T]
    rows = (pos >= q_lo[:, :, None]) & (pos < q_hi[:, :, None])  # [B, query, key]
    cols = (pos >= k_lo[:, :, None]) & (pos < k_hi[:, :, None])  # [B, key, query]
    assert torch.equal(rows, allowed)
    assert torch.equal(cols, allowed.transpose(1, 2))
    single = attention_module._doc_ranges(None, T, True, window, batch=2, device="cpu")
    assert torch.equal(single[1], ranges[1])  # no doc_ids: one document per row


SOFTCAP_CASES = [
    # dtype, causal, window, document lengths, Hq, Hkv, T
    (torch.float32, True, 0, None, 4, 2, 41),
    (torch.float16, True, 9, [20, 30], 2, 1, 50),
    (torch.float32, False, 0, [13, 20], 2, 2, 33),
]


@pytest.mark.parametrize("dtype,causal,window,lengths,HQ,HKV,T", SOFTCAP_CASES)
def test_softcap(dtype, causal, window, lengths, HQ, HKV, T, against_reference):
    # Scores far beyond the cap (|s| up to ~80 with scale 1): tanh saturates for many of them.
    q, k, v, do = _inputs(1, HQ, HKV, T, 32, seed=T)
    q = 4 * q
    doc_ids = None if lengths is None else _doc_ids(lengths)[None]
    scores = (q @ k.repeat_interleave(HQ // HKV, dim=1).transpose(-1, -2)).abs()
    assert scores.max() > 60  # the cap bites
    against_reference((q, k, v), do, dtype, f"softcap {dtype} causal={causal} window={window}", score_bound=30.0,
                      causal=causal, scale=1.0, softcap=30.0, window=window, doc_ids=doc_ids)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [[45], [13, 30], [1, 9, 17, 3, 20]], ids=["1doc", "2docs", "5docs"])
def test_packed_documents_equal_separate_runs(lengths, causal, grads_of, assert_close_to_float64):
    T = sum(lengths)
    q, k, v, do = _inputs(1, 4, 2, T, 32, seed=len(lengths))
    doc_ids = _doc_ids(lengths)[None]
    packed = grads_of(triton_attention, (q, k, v), do, torch.float32, causal=causal, doc_ids=doc_ids)

    # The same documents run one by one through the kernel, on slices of the same leaves.
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    outs, s = [], 0
    for n in lengths:
        outs.append(triton_attention(*(t[:, :, s:s + n] for t in x), causal=causal))
        s += n
    out = torch.cat(outs, dim=2)
    separate = [out.detach(), *torch.autograd.grad(out, x, do)]
    for name, a, b in zip(("out", "dq", "dk", "dv"), packed, separate):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")

    ref64 = grads_of(attention_reference, (q, k, v), do, torch.float64, causal=causal, doc_ids=doc_ids)
    same = grads_of(attention_reference, (q, k, v), do, torch.float32, causal=causal, doc_ids=doc_ids)
    assert_close_to_float64(packed, ref64, same, torch.float32, f"docs {lengths}", NAMES)


@pytest.mark.parametrize("causal,dtype", [(True, torch.float32), (False, torch.float16)])
def test_padding_rows_are_zero(causal, dtype, grads_of, assert_close_to_float64):
    T = 64
    doc_ids = torch.stack([
        _doc_ids([40], pad_after=24),  # padding shares blocks with a long document
        _doc_ids([20, 30], pad_before=6, pad_after=8),
        torch.full((T,), -1),  # a row of nothing but padding
    ])
    q, k, v, do = _inputs(3, 2, 1, T, 32, seed=11)
    got = grads_of(triton_attention, (q, k, v), do, dtype, causal=causal, doc_ids=doc_ids)
    pad = doc_ids < 0  # [B, T]
    out, dq, dk, dv = got
    for name, t in zip(("out", "dq", "dk", "dv"), got):
        assert not torch.isnan(t).any() and torch.isfinite(t).all(), name
    assert (out.permute(0, 2, 1, 3)[pad] == 0).all()
    assert (dq.permute(0, 2, 1, 3)[pad] == 0).all()
    assert (dk.permute(0, 2, 1, 3)[pad] == 0).all()
    assert (dv.permute(0, 2, 1, 3)[pad] == 0).all()
    ref64 = grads_of(attention_reference, (q, k, v), do, torch.float64, causal=causal, doc_ids=doc_ids)
    same = grads_of(attention_reference, (q, k, v), do, dtype, causal=causal, doc_ids=doc_ids)
    assert_close_to_float64(got, ref64, same, dtype, "padding", NAMES)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the NaN poison
def test_blocks_outside_the_ranges_are_skipped():
    # The interpreter uses 16 x 16 blocks. Poison what a program must never visit: a
    # visited block would turn the result into NaN even where its mask is all false.
    T, nan = 64, float("nan")
    q, k, v, do = _inputs(1, 2, 1, T, 32, seed=3)
    doc_ids = _doc_ids([32, 32])[None]

    v_bad = v.clone()
    v_bad[:, :, :32] = nan  # document 0's values
    out = triton_attention(q, k, v_bad, causal=False, doc_ids=doc_ids)
    assert torch.isfinite(out[:, :, 32:]).all()

    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :, 16:] = nan  # keys after the first block: causal rows 0..15 never see them
    v_bad[:, :, 16:] = nan
    out = triton_attention(q, k_bad, v_bad, causal=True)
    assert torch.isfinite(out[:, :, :16]).all()

    # Backward: dK/dV of document 1 never read document 0's queries, dQ of document 1
    # never reads document 0's keys.
    x = [t.clone() for t in (q, k, v)]
    x[0][:, :, :32] = nan
    x[1][:, :, :32] = nan
    x = [t.requires_grad_() for t in x]
    out = triton_attention(*x, causal=True, doc_ids=doc_ids)
    dq, dk, dv = torch.autograd.grad(out, x, do)
    for name, g in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(g[:, :, 32:]).all(), name

    # A sliding window of 16 keys: rows 32..47 see keys from 17 on, so their programs (forward
    # and dQ) start there; keys 0..16 are poisoned and rows 16..31, which do see them, turn NaN.
    x = [t.clone() for t in (q, k, v)]
    x[1][:, :, :17] = nan
    x[2][:, :, :17] = nan
    x = [t.requires_grad_() for t in x]
    out = triton_attention(*x, causal=True, window=16)
    dq, _, _ = torch.autograd.grad(out, x, do)
    assert out[:, :, 16:32].isnan().all()
    assert torch.isfinite(out[:, :, 32:]).all() and torch.isfinite(dq[:, :, 32:]).all()

    # dK/dV: key j is seen by queries j <= i < j + 16, so keys below 32 never read queries from 48 on.
    x = [t.clone() for t in (q, k, v)]
    x[0][:, :, 48:] = nan
    x = [t.requires_grad_() for t in x]
    out = triton_attention(*x, causal=True, window=16)
    _, dk, dv = torch.autograd.grad(out, x, do)
    assert dk[:, :, 33:48].isnan().all()  # they are seen by poisoned queries
    assert torch.isfinite(dk[:, :, :32]).all() and torch.isfinite(dv[:, :, :32]).all()


def test_non_contiguous_inputs(grads_of):
    B, T, HQ, HKV, D = 2, 33, 4, 2, 32
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(B, T, (HQ + 2 * HKV) * D, generator=g)  # fused projection output
    q, k, v = qkv.view(B, T, HQ + 2 * HKV, D).transpose(1, 2).split([HQ, HKV, HKV], dim=1)
    do = torch.randn(B, T, HQ, D, generator=g).transpose(1, 2)  # [B, HQ, T, D], strided
    assert not (q.is_contiguous() or k.is_contiguous() or do.is_contiguous())
    strided = grads_of(triton_attention, (q, k, v), do, torch.float32, causal=True)
    dense = grads_of(triton_attention, (q.contiguous(), k.contiguous(), v.contiguous()), do.contiguous(),
                 torch.float32, causal=True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), strided, dense):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    ref = grads_of(attention_reference, (q, k, v), do, torch.float64, causal=True)
    for a, r in zip(strided, ref):
        torch.testing.assert_close(a.double(), r, rtol=0, atol=1e-5)


def test_bf16_is_computed_in_fp32_under_the_interpreter(grads_of):
    q, k, v, do = _inputs(1, 2, 1, 19, 32, seed=2)
    got = grads_of(triton_attention, (q, k, v), do, torch.bfloat16, causal=True)
    ref = grads_of(attention_reference, (q, k, v), do, torch.float64, causal=True)
    for a, r in zip(got, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), r, rtol=0, atol=3e-2)


def test_input_checks():
    q, k, v, _ = _inputs(1, 4, 2, 8, 32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        triton_attention(q, k[:, :1].expand(1, 3, 8, 32), v[:, :1].expand(1, 3, 8, 32))
    with pytest.raises(ValueError, match="head dim"):
        triton_attention(q[..., :24], k[..., :24], v[..., :24])
    with pytest.raises(ValueError, match="dtype"):
        triton_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="doc_ids"):
        triton_attention(q, k, v, doc_ids=torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="needs causal=True"):
        triton_attention(q, k, v, causal=False, window=4)
    with pytest.raises(ValueError, match="window must be an integer"):
        triton_attention(q, k, v, window=-1)
    with pytest.raises(ValueError, match="softcap must be"):
        triton_attention(q, k, v, softcap=-5.0)


def test_available_under_the_interpreter(monkeypatch):
    ok, why = triton_attention_available()
    assert ok and "interpreter" in why
    monkeypatch.delenv("TRITON_INTERPRET")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the no-GPU message cannot be checked here")
    ok, why = triton_attention_available()
    assert not ok and "no CUDA GPU" in why and "TRITON_INTERPRET=1" in why
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        triton_attention(*_inputs(1, 1, 1, 4, 16)[:3])


def _python(code: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_interpreter_set_too_late_is_reported():
    result = _python("""
        import os, torch
        import sftplug.kernels.attention as attn
        os.environ["TRITON_INTERPRET"] = "1"
        ok, why = attn.triton_attention_available()
        assert not ok and "before the first import" in why, why
        try:
            attn.triton_attention(*torch.randn(3, 1, 1, 4, 16))
        except RuntimeError as exc:
            assert "before the first import" in str(exc)
            print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.slow
def test_import_without_triton():
    result = _python("""
        import sys
        sys.modules["triton"] = None  # as if it were not installed
        import torch
        from sftplug.kernels.attention import triton_attention, triton_attention_available
        ok, why = triton_attention_available()
        assert not ok and "triton" in why, why
        try:
            triton_attention(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16))
        except RuntimeError as exc:
            assert "triton" in str(exc)
            print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
