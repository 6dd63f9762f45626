"""The Triton RoPE (in place, partial rotary, per-token angles) on the CPU, under the Triton interpreter.

The output and d(qkv) are compared with a float64 plain-PyTorch reference: the kernel's
error may be at most twice the same-dtype PyTorch form's (plus a small floor). The op
rotates in place, so it is fed a copy of a leaf, and gradients are taken w.r.t. the leaf.
Heads and dims the op does not rotate must pass through bit for bit, both ways.
"""

import pytest
import torch

pytest.importorskip("triton")

from sftplug.kernels.rope import rope, rope_reference  # noqa: E402

pytestmark = pytest.mark.interpreted

NAMES = ("out", "d_qkv")


def _angles(positions, rotary: int, base: float = 10000.0):
    """cos, sin [B, T, 1, R/2] (float64) for integer positions [B, T]."""
    half = rotary // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64) / half)
    freqs = positions[..., None].double() * inv_freq
    return freqs.cos()[:, :, None], freqs.sin()[:, :, None]


def _packed_positions(B, T, seed):
    """Per-row positions that restart where a new document begins (packed batches)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        cuts = sorted(torch.randperm(T, generator=g)[: max(1, T // 4)].tolist())
        starts = torch.zeros(T, dtype=torch.long)
        starts[cuts] = 1
        starts[0] = 1
        doc_start = torch.cummax(torch.where(starts.bool(), torch.arange(T), 0), 0).values
        rows.append(torch.arange(T) - doc_start + int(torch.randint(0, 40, (1,), generator=g)))
    return torch.stack(rows)


def _inputs(B, T, H, D, rotary, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, H, D, generator=g)
    dout = torch.randn(B, T, H, D, generator=g)
    cos, sin = _angles(_packed_positions(B, T, seed), rotary)
    return qkv, dout, cos, sin


def _rope_of_copy(qkv, **kw):
    return rope(qkv.clone(), **kw)  # the op rotates in place: never on the leaf itself


def _check(qkv, dout, cos, sin, n_rotated, dtype, grads_of, assert_close_to_float64, what, cos_dtype=None):
    cos_d, sin_d = cos.to(cos_dtype or dtype), sin.to(cos_dtype or dtype)  # every form sees the same angles
    # A fresh gradient each time: the backward overwrites the one it is given.
    got = grads_of(_rope_of_copy, (qkv,), dout.clone(), dtype, cos=cos_d, sin=sin_d, n_rotated=n_rotated)
    ref64 = grads_of(rope_reference, (qkv,), dout, torch.float64, cos=cos_d.double(), sin=sin_d.double(),
                     n_rotated=n_rotated)
    same = grads_of(rope_reference, (qkv,), dout, dtype, cos=cos_d, sin=sin_d, n_rotated=n_rotated)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_close_to_float64(got, ref64, same, dtype, what, NAMES)
    return got


CASES = [
    # B, T, H, D, R, n_rotated, dtype
    (2, 5, 4, 32, 32, 4, torch.float32),  # full rotary, every head
    (1, 7, 6, 64, 64, 4, torch.float16),  # full rotary, v heads left alone
    (2, 6, 5, 64, 32, 3, torch.float32),  # partial rotary
    (1, 4, 3, 96, 64, 2, torch.float16),  # partial rotary, D not a power of two
    (2, 3, 4, 64, 24, 3, torch.float32),  # R/2 = 12 not a power of two: masked dims
    (1, 2, 20, 128, 128, 18, torch.float16),  # several blocks of heads per token
    (1, 1, 3, 32, 32, 2, torch.float16),  # one token
    (1, 1, 3, 32, 32, 2, torch.float32),
]


@pytest.mark.parametrize("B,T,H,D,R,n_rotated,dtype", CASES)
def test_matches_reference(B, T, H, D, R, n_rotated, dtype, grads_of, assert_close_to_float64):
    qkv, dout, cos, sin = _inputs(B, T, H, D, R, seed=B * 100 + T * 10 + D + R)
    out, grad = _check(qkv, dout, cos, sin, n_rotated, dtype, grads_of, assert_close_to_float64,
                       f"B={B} T={T} H={H} D={D} R={R} rotated={n_rotated} {dtype}")
    # What is not rotated passes through bit for bit, forward and backward.
    x, g = qkv.to(dtype), dout.to(dtype)
    assert torch.equal(out[:, :, n_rotated:], x[:, :, n_rotated:])
    assert torch.equal(grad[:, :, n_rotated:], g[:, :, n_rotated:])
    assert torch.equal(out[:, :, :n_rotated, R:], x[:, :, :n_rotated, R:])
    assert torch.equal(grad[:, :, :n_rotated, R:], g[:, :, :n_rotated, R:])


def test_fp32_angles_with_fp16_qkv(grads_of, assert_close_to_float64):
    qkv, dout, cos, sin = _inputs(2, 5, 4, 64, 64, seed=3)
    _check(qkv, dout, cos, sin, 3, torch.float16, grads_of, assert_close_to_float64, "fp32 cos",
           cos_dtype=torch.float32)


def test_positions_are_per_row():
    # Packed rows: each row has its own positions; the same tokens at other positions rotate differently.
    qkv, _, _, _ = _inputs(2, 6, 3, 32, 32, seed=4)
    qkv[1] = qkv[0]
    positions = torch.stack([torch.arange(6), torch.tensor([0, 1, 2, 0, 1, 2])])
    cos, sin = (c.float() for c in _angles(positions, 32))
    out = rope(qkv.clone(), cos, sin, 2)
    torch.testing.assert_close(out, rope_reference(qkv, cos, sin, 2), rtol=1e-6, atol=1e-6)
    assert torch.equal(out[0, :3], out[1, :3]) and not torch.allclose(out[0, 3:, :2], out[1, 3:, :2])
    # One row of angles for the whole batch ([1, T, 1, R/2]) is the same as that row repeated.
    shared = rope(qkv.clone(), cos[:1], sin[:1], 2)
    repeated = rope(qkv.clone(), cos[:1].repeat(2, 1, 1, 1), sin[:1].repeat(2, 1, 1, 1), 2)
    assert torch.equal(shared, repeated)


def test_rotates_in_place():
    qkv, _, cos, sin = _inputs(2, 4, 5, 64, 32, seed=5)
    cos, sin = cos.float(), sin.float()
    given = qkv.clone()
    out = rope(given, cos, sin, 3)
    assert out is given and out.data_ptr() == given.data_ptr()
    torch.testing.assert_close(given, rope_reference(qkv, cos, sin, 3), rtol=1e-6, atol=1e-6)


def test_backward_in_place_on_the_gradient_and_its_copies():
    qkv, dout, cos, sin = _inputs(2, 4, 5, 64, 64, seed=6)
    cos, sin = cos.float(), sin.float()
    x64 = qkv.double().requires_grad_()
    g = torch.Generator().manual_seed(7)
    strided = torch.randn(2, 4, 64, 5, generator=g).transpose(-1, -2)  # last dim not contiguous
    expanded = torch.randn(1, 4, 5, 64, generator=g).expand(2, 4, 5, 64)  # rows share memory
    for grad_out in (dout.clone(), strided, expanded):
        values = grad_out.clone(memory_format=torch.contiguous_format)
        leaf = qkv.clone().requires_grad_()
        out = rope(leaf.clone(), cos, sin, 3)
        (grad,) = torch.autograd.grad(out, leaf, grad_out)
        if grad_out.is_contiguous():
            assert grad.data_ptr() == grad_out.data_ptr()  # overwritten in place: no new buffer
        else:
            assert torch.equal(grad_out, values)  # a copy was rotated instead
        x64.grad = None
        rope_reference(x64, cos.double(), sin.double(), 3).backward(values.double())
        torch.testing.assert_close(grad.double(), x64.grad, rtol=0, atol=1e-5)


def test_in_a_fused_projection():
    # As in sftplug's attention: a linear's output viewed as [B, T, Hq + 2 Hkv, D], q and k rotated.
    B, T, HQ, HKV, D = 2, 5, 4, 2, 32
    g = torch.Generator().manual_seed(8)
    x = torch.randn(B, T, 16, generator=g)
    weight = torch.randn((HQ + 2 * HKV) * D, 16, generator=g) / 4
    cos, sin = (c.float() for c in _angles(_packed_positions(B, T, seed=8), D))
    dout = torch.randn(B, T, HQ + 2 * HKV, D, generator=g)
    results = []
    for form in (rope, rope_reference):
        w = weight.clone().requires_grad_()
        qkv = form(torch.nn.functional.linear(x, w).view(B, T, HQ + 2 * HKV, D), cos, sin, HQ + HKV)
        qkv.backward(dout.clone())
        results.append((qkv.detach(), w.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_input_checks():
    qkv, _, cos, sin = _inputs(2, 4, 3, 32, 32, seed=9)
    cos, sin = cos.float(), sin.float()
    with pytest.raises(ValueError, match="last dim contiguous"):
        rope(qkv.transpose(-1, -2), cos, sin, 2)
    with pytest.raises(ValueError, match=r"\[B, T, 1, R/2\]"):
        rope(qkv, cos[:, :3], sin[:, :3], 2)
    with pytest.raises(ValueError, match="rotated dims"):
        rope(qkv[..., :16].contiguous(), cos, sin, 2)
    with pytest.raises(ValueError, match="dtype"):
        rope(qkv.half(), cos.double(), sin.double(), 2)
    with pytest.raises(ValueError, match="n_rotated"):
        rope(qkv, cos, sin, 4)
