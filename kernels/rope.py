"""Rotary position embedding in Triton, in place on the fused q | k | v projection.

``qkv`` [B, T, H, D] is sftplug's fused projection output viewed as [B, T, Hq + 2 Hkv, D];
the first ``n_rotated`` heads (q and k, ``Hq + Hkv``) are rotated in one launch and v is
left alone. Rotation as Hugging Face's ``rotate_half`` over the first R = 2 * cos.shape[-1]
dims of each head: with x1 = x[..., :R/2] and x2 = x[..., R/2:R],
``out1 = x1 cos - x2 sin``, ``out2 = x2 cos + x1 sin``; dims R..D pass through (partial
rotary). ``cos``, ``sin`` [B, T, 1, R/2] are per token, so packed batches (positions that
restart inside a row) and per-layer bases (Gemma 3's local and global layers pass their own
cos/sin) need nothing special. Computed in fp32, rounded once.

One program per (token, block of heads) loads that token's cos/sin once and rotates its
heads in place. The backward is the inverse rotation (sin -> -sin) of the incoming
gradient, in place on it, by the same kernel.

Public API: :func:`rope`, :func:`rope_reference`, :func:`compile_specs`.
"""

from __future__ import annotations

import torch

from sftplug.kernels.runtime import IMPORT_ERROR, check_runnable, interpreted, on_device, tl, triton

__all__ = ["Rope", "compile_specs", "rope", "rope_reference"]

_W1_QKV = (8, 2048, 40, 64)  # W1's qkv [B, T, Hq + 2 Hkv, D]
_W1_ROTATED = 36  # Hq + Hkv


# ---------------------------------------------------------------------------------------
# Plain-PyTorch reference
# ---------------------------------------------------------------------------------------


def rope_reference(qkv, cos, sin, n_rotated: int):
    """The rotation in plain PyTorch, out of place, in qkv's dtype (HF's rotate_half form)."""
    half = cos.shape[-1]
    cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)
    rotated, rest = qkv[:, :, :n_rotated], qkv[:, :, n_rotated:]
    x1, x2, tail = rotated[..., :half], rotated[..., half:2 * half], rotated[..., 2 * half:]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, tail), dim=-1)
    return torch.cat((rotated, rest), dim=2)


# ---------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rope_kernel(
        X,  # [B, T, H, D] rotated in place: heads < n_rotated, dims < 2 * HALF (last dim contiguous)
        COS,  # [B, T, 1, HALF] cosines of each token's angles (last dim contiguous, batch stride may be 0)
        SIN,  # [B, T, 1, HALF] sines
        stride_xb, stride_xt, stride_xh,
        stride_cb, stride_ct,
        stride_sb, stride_st,
        n_rotated,  # heads to rotate (the first ones)
        HALF: tl.constexpr,  # R / 2
        BLOCK_HALF: tl.constexpr,  # HALF rounded up to a power of two
        BLOCK_H: tl.constexpr,  # heads per program
        INVERSE: tl.constexpr,  # rotate by minus the angle (the backward)
    ):
        t = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        heads = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_HALF)
        cos_ptrs = COS + b * stride_cb + t * stride_ct + dims
        sin_ptrs = SIN + b * stride_sb + t * stride_st + dims
        if BLOCK_HALF == HALF:
            mask = (heads < n_rotated)[:, None]  # constant along the dims: vector loads stay whole
            cos = tl.load(cos_ptrs).to(tl.float32)
            sin = tl.load(sin_ptrs).to(tl.float32)
        else:
            dims_in = dims < HALF
            mask = (heads < n_rotated)[:, None] & dims_in[None, :]
            cos = tl.load(cos_ptrs, mask=dims_in, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptrs, mask=dims_in, other=0.0).to(tl.float32)
        if INVERSE:
            sin = -sin
        x1_ptrs = X + b * stride_xb + t * stride_xt + heads[:, None] * stride_xh + dims[None, :]
        x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x1_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        out1 = x1 * cos[None, :] - x2 * sin[None, :]
        out2 = x2 * cos[None, :] + x1 * sin[None, :]
        tl.store(x1_ptrs, out1.to(X.dtype.element_ty), mask=mask)
        tl.store(x1_ptrs + HALF, out2.to(X.dtype.element_ty), mask=mask)

    _jit_interpreted = interpreted(_rope_kernel)  # the mode @triton.jit chose at this import
    _FP_FUSION = {} if _jit_interpreted else {"enable_fp_fusion": True}  # a * b + c as one FMA, as compiled
else:  # pragma: no cover - depends on the environment
    _jit_interpreted = False


# ---------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------


def _rope_config(n_rotated: int, half: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_HALF, num_warps, num_stages): tiles of up to 512 elements per half,
    8 per thread (16-byte loads of fp16 / bf16); no loop, so one stage."""
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(n_rotated, 1)), max(1, 512 // block_half))
    return block_h, block_half, max(1, min(4, block_h * block_half // 256)), 1


def _rotate_in_place(x, cos, sin, n_rotated: int, inverse: bool) -> None:
    """x [B, T, H, D] (last dim contiguous); cos, sin [B, T, 1, R/2] (last dim contiguous)."""
    B, T, _, _ = x.shape
    half = cos.shape[-1]
    if x.numel() == 0 or n_rotated == 0:
        return
    block_h, block_half, warps, stages = _rope_config(n_rotated, half)
    with on_device(x):
        _rope_kernel[(T, B, triton.cdiv(n_rotated, block_h))](
            x, cos, sin, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
            sin.stride(0), sin.stride(1), n_rotated,
            HALF=half, BLOCK_HALF=block_half, BLOCK_H=block_h, INVERSE=inverse, num_warps=warps, num_stages=stages,
            **_FP_FUSION)


def _writable_in_place(t: torch.Tensor) -> bool:
    """Last dim contiguous and no two elements share memory (an expanded gradient does)."""
    if t.stride(-1) != 1:
        return False
    reach = 0  # the largest offset the smaller-strided dims reach
    for stride, size in sorted((t.stride(i), t.shape[i]) for i in range(t.dim()) if t.shape[i] > 1):
        if stride <= reach:
            return False
        reach += stride * (size - 1)
    return True


class Rope(torch.autograd.Function):
    """RoPE of the first n_rotated heads, in place on qkv, with the Triton kernel."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_rotated: int):
        _rotate_in_place(qkv, cos, sin, n_rotated, inverse=False)
        ctx.mark_dirty(qkv)
        ctx.save_for_backward(cos, sin)
        ctx.n_rotated = n_rotated
        return qkv

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        # The rotation is orthogonal: its gradient is the inverse rotation. It overwrites the
        # incoming gradient (a fresh buffer from the attention's backward in sftplug); the
        # other heads' gradient passes through as it is.
        if not _writable_in_place(grad):
            grad = grad.clone(memory_format=torch.contiguous_format)
        _rotate_in_place(grad, cos, sin, ctx.n_rotated, inverse=True)
        return grad, None, None, None


def rope(qkv, cos, sin, n_rotated: int):
    """Rotate the first ``n_rotated`` heads of ``qkv`` [B, T, H, D] in place and return ``qkv``.

    ``cos``, ``sin``: [B, T, 1, R/2] (or [1, T, 1, R/2] for every row alike), any strides,
    qkv's dtype or fp32; R = 2 * cos.shape[-1] <= D, and only each head's first R dims
    rotate. Differentiable in qkv (not in cos and sin); qkv must not be a leaf that requires
    grad (autograd forbids in-place ops on those), and the backward overwrites the incoming
    gradient. Under TRITON_INTERPRET=1 bf16 rounds differently (Triton's interpreter).
    """
    if qkv.dim() != 4 or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be [B, T, H, D] with the last dim contiguous; "
                         f"got shape {tuple(qkv.shape)}, strides {qkv.stride()}")
    B, T, H, D = qkv.shape
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"qkv must be fp16, bf16 or fp32; got {qkv.dtype}")
    if cos.dim() != 4 or cos.shape != sin.shape or cos.shape[0] not in (1, B) or cos.shape[1:3] != (T, 1):
        raise ValueError(f"cos and sin must be [B, T, 1, R/2] = [{B}, {T}, 1, R/2]; "
                         f"got {tuple(cos.shape)}, {tuple(sin.shape)}")
    half = cos.shape[-1]
    if not 1 <= half <= D // 2:
        raise ValueError(f"the rotated dims R = 2 * cos.shape[-1] = {2 * half} must be in [2, D = {D}]")
    if cos.dtype != sin.dtype or cos.dtype not in (qkv.dtype, torch.float32):
        raise ValueError(f"cos and sin must share qkv's dtype ({qkv.dtype}) or fp32; got {cos.dtype}, {sin.dtype}")
    if not 0 <= n_rotated <= H:
        raise ValueError(f"n_rotated must be in [0, H = {H}]; got {n_rotated}")
    if not (qkv.device == cos.device == sin.device):
        raise ValueError("qkv, cos and sin must be on one device")
    check_runnable("the Triton RoPE", __name__, _jit_interpreted, qkv)
    cos, sin = (c if c.stride(-1) == 1 else c.contiguous() for c in (cos, sin))
    cos, sin = cos.expand(B, T, 1, half), sin.expand(B, T, 1, half)  # one row for all: batch stride 0
    return Rope.apply(qkv, cos, sin, int(n_rotated))


# ---------------------------------------------------------------------------------------
# Compile report
# ---------------------------------------------------------------------------------------


def compile_specs(dtype: str) -> list[dict]:
    """Each kernel of this module as a W1 training run launches it, for kernels/compile_report.py.

    qkv [8, 2048, 40, 64] with 36 rotated heads; cos and sin [8, 2048, 1, R/2] in the
    activations' dtype (sftplug's Transformer.rope); full rotary (R = 64) and partial (R = 32).
    """
    if triton is None:
        raise RuntimeError(f"triton is not importable ({IMPORT_ERROR})")
    B, T, H, D = _W1_QKV
    pointer = "*" + dtype
    strides = ["stride_xb", "stride_xt", "stride_xh", "stride_cb", "stride_ct", "stride_sb", "stride_st"]
    signature = {"X": pointer, "COS": pointer, "SIN": pointer, **dict.fromkeys(strides, "i32"), "n_rotated": "i32",
                 **dict.fromkeys(["HALF", "BLOCK_HALF", "BLOCK_H", "INVERSE"], "constexpr")}
    specs = []
    for rotary in (D, D // 2):
        half = rotary // 2
        block_h, block_half, warps, stages = _rope_config(_W1_ROTATED, half)
        # All strides at W1 (qkv's T*H*D, H*D, D; cos's T*R/2, R/2) are multiples of 16.
        assert all(s % 16 == 0 for s in (T * H * D, H * D, D, T * half, half))
        for kind, inverse in (("fwd", False), ("bwd", True)):
            specs.append(dict(
                name=f"rope_{kind}_r{rotary}", fn=_rope_kernel, signature=dict(signature),
                constexprs={"HALF": half, "BLOCK_HALF": block_half, "BLOCK_H": block_h, "INVERSE": inverse},
                num_warps=warps, num_stages=stages, divisible=["X", "COS", "SIN", *strides]))
    return specs
