"""The Triton attention kernel compiled for a CUDA GPU: bf16 / fp16 on realistic shapes.

Forward and gradients are compared with the fp32 plain-PyTorch reference. The kernel's
error may be at most twice that of the same-dtype PyTorch implementation plus a bf16-
sized floor relative to the largest reference value. No timings are asserted here.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (the CPU tests are in test_attention.py)", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1: these tests need compiled kernels", allow_module_level=True)
pytest.importorskip("triton")

from sftplug.kernels.attention import (  # noqa: E402
    attention_reference,
    triton_attention,
    triton_attention_available,
)

_OK, _WHY = triton_attention_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"Triton attention unavailable: {_WHY}")

@pytest.fixture(autouse=True)
def _exact_fp32_reference():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # another test may have switched TF32 on
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


# Allowed error beyond twice torch's same-dtype error, relative to the largest value.
FLOOR = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(B, HQ, HKV, T, D, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, do = (torch.randn(B, HQ, T, D, device="cuda", generator=g) for _ in range(2))
    k, v = (torch.randn(B, HKV, T, D, device="cuda", generator=g) for _ in range(2))
    return q, k, v, do


def _check(grads_of, q, k, v, do, dtype, **kw):
    got = grads_of(triton_attention, (q, k, v), do, dtype, **kw)
    ref = grads_of(attention_reference, (q, k, v), do, torch.float32, **kw)
    same = grads_of(attention_reference, (q, k, v), do, dtype, **kw)
    for name, a, r, s in zip(("out", "dq", "dk", "dv"), got, ref, same):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert torch.isfinite(a).all(), f"{name}: not finite"
        err = (a.float() - r).abs().max().item()
        base = (s.float() - r).abs().max().item()
        floor = FLOOR[dtype] * max(1.0, r.abs().max().item())
        assert err <= 2 * base + floor, f"{name}: error {err:.3g} > 2 x torch's {base:.3g} + {floor:.3g}"
    return got


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("B,HQ,HKV,T,D", [(2, 8, 8, 1000, 64), (1, 16, 16, 2048, 128), (1, 8, 8, 333, 32)])
def test_matches_reference(B, HQ, HKV, T, D, causal, dtype, grads_of):
    q, k, v, do = _inputs(B, HQ, HKV, T, D, seed=T + D)
    _check(grads_of, q, k, v, do, dtype, causal=causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gqa_32_to_4(dtype, grads_of):
    q, k, v, do = _inputs(1, 32, 4, 1024, 128, seed=1)
    _check(grads_of, q, k, v, do, dtype, causal=True)


def test_head_dim_256(grads_of):
    q, k, v, do = _inputs(1, 4, 2, 700, 256, seed=2)
    _check(grads_of, q, k, v, do, torch.bfloat16, causal=True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_packed_documents_and_padding(causal, grads_of):
    B, T = 2, 2048
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(B):
        cuts = torch.randint(1, T - 200, (6,), generator=g).sort().values.tolist()
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, T - 150]) if b > a]
        ids = [i for i, n in enumerate(lengths) for _ in range(n)]
        rows.append(ids + [-1] * (T - len(ids)))  # padding at the end
    doc_ids = torch.tensor(rows, device="cuda")
    q, k, v, do = _inputs(B, 8, 2, T, 128, seed=4)
    out, dq, dk, dv = _check(grads_of, q, k, v, do, torch.bfloat16, causal=causal, doc_ids=doc_ids)
    pad = doc_ids < 0
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert (t.transpose(1, 2)[pad] == 0).all(), name


def test_non_contiguous_fused_qkv():
    B, T, HQ, HKV, D = 2, 777, 16, 4, 64
    qkv = torch.randn(B, T, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.view(B, T, HQ + 2 * HKV, D).transpose(1, 2).split([HQ, HKV, HKV], dim=1)
    out = triton_attention(q, k, v, causal=True)
    dense = triton_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    torch.testing.assert_close(out, dense, rtol=0, atol=0)
