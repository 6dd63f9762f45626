"""Fused RMSNorm in Triton: forward and backward, the weight's gradient included.

Two forms, as the models compute them (``normalized = x * rsqrt(mean(x^2) + eps)`` in fp32):

- Llama (``gemma=False``): ``weight * normalized.to(x.dtype)``, in the promoted dtype of x
  and weight (the product in fp32, rounded once);
- Gemma (``gemma=True``): ``((1 + weight) * normalized)`` in fp32, then ``x.dtype``.

Forward: each program loops over rows (see :func:`_programs` for why); a row that fits
one block (``n_cols <= BLOCK``) is read once and kept in registers, a longer one is read
twice in BLOCK chunks (sum of squares, then normalize and store). The forward saves x and
the per-row ``rstd = 1 / rms`` in fp32, nothing else.

Backward: ``dx = rstd * (dn - normalized * mean(dn * normalized))`` with ``dn = dy * w``
(or ``dy * (1 + w)``), in fp32, rounded once to x's dtype. dweight, only when the weight
is trained (a constexpr switches it off for frozen norms), is accumulated in fp32 per
program into an ``[n_programs, C]`` buffer that the host sums, as Liger-Kernel does.

Public API: :func:`rms_norm` (alias of :class:`RMSNormFunction`), :func:`rms_norm_reference`,
:func:`rms_norm_available`, :func:`compile_specs`.
"""

from __future__ import annotations

import torch

from sftplug.kernels.runtime import check_cuda, interpreted, on_device, sm_count, tl, triton, triton_available

__all__ = ["RMSNormFunction", "compile_specs", "rms_norm", "rms_norm_available", "rms_norm_reference"]

_MAX_BLOCK = 8192  # rows up to this many columns are one block, read once
# Longer rows (hidden 12288, 16384) loop over chunks of this many columns: 8192-column chunks
# spill registers in the backward on sm_90a.
_CHUNK = 4096
_WARPS_PER_SM = 32  # resident warps per SM the row-looping grid aims at (see _programs)
_INTERPRET_PROGRAMS = 3  # under TRITON_INTERPRET=1: few programs, several rows each
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rms_norm_available() -> tuple[bool, str]:
    """Whether the kernels can run here, and why (or why not)."""
    return triton_available(__name__, _jit_interpreted)


# ---------------------------------------------------------------------------------------
# Plain-PyTorch reference
# ---------------------------------------------------------------------------------------


def rms_norm_reference(x, weight, eps: float, gemma: bool = False):
    """RMSNorm in plain PyTorch with the kernels' rounding points; float64 inputs give the exact result."""
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or float64 for float64 inputs
    h = x.to(acc)
    normalized = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return ((1 + weight.to(acc)) * normalized).to(x.dtype)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return (weight.to(acc) * normalized.to(x.dtype).to(acc)).to(out_dtype)


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _weight_factor(W, offs, mask, GEMMA: tl.constexpr):
        """The factor the normalized row is multiplied by, in fp32: w, or 1 + w (Gemma)."""
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        if GEMMA:
            w = 1.0 + w
        return w

    @triton.jit
    def _scaled(normalized, factor, x_dtype, GEMMA: tl.constexpr):
        """The output before its final rounding (fp32): Llama rounds normalized to x's dtype first."""
        if GEMMA:
            return factor * normalized
        return factor * normalized.to(x_dtype).to(tl.float32)

    @triton.jit
    def _weight_grad_term(dy, normalized, x_dtype, GEMMA: tl.constexpr):
        """One row's dweight (fp32): dy times what the weight multiplied in the forward."""
        if GEMMA:
            return dy * normalized
        return dy * normalized.to(x_dtype).to(tl.float32)

    @triton.jit
    def _rms_norm_fwd_kernel(
        X,  # [n_rows, n_cols] input (row stride stride_x, columns contiguous)
        W,  # [n_cols] weight
        Y,  # [n_rows, n_cols] output (row stride stride_y): the promoted dtype (Llama) or x's (Gemma)
        RSTD,  # fp32 [n_rows] 1 / rms of each row, written here for the backward
        stride_x, stride_y, n_rows, n_cols, eps,
        GEMMA: tl.constexpr,  # (1 + w) * normalized; else w * normalized rounded to x's dtype
        BLOCK: tl.constexpr,  # columns per chunk (a power of two)
        ONE_BLOCK: tl.constexpr,  # n_cols <= BLOCK: a row is one chunk, read once
    ):
        pid = tl.program_id(0)
        n_programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        x_row = X + pid.to(tl.int64) * stride_x  # this program's rows: pid, pid + n_programs, ...
        y_row = Y + pid.to(tl.int64) * stride_y
        x_step = n_programs.to(tl.int64) * stride_x
        y_step = n_programs.to(tl.int64) * stride_y
        if ONE_BLOCK:
            in_row = cols < n_cols
            factor = _weight_factor(W, cols, in_row, GEMMA)  # once per program
            for row in range(pid, n_rows, n_programs):
                x = tl.load(x_row + cols, mask=in_row, other=0.0).to(tl.float32)
                rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
                tl.store(RSTD + row, rstd)
                y = _scaled(x * rstd, factor, X.dtype.element_ty, GEMMA)
                tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=in_row)
                x_row += x_step
                y_row += y_step
        else:
            for row in range(pid, n_rows, n_programs):
                squares = tl.zeros([BLOCK], dtype=tl.float32)
                for start in range(0, n_cols, BLOCK):
                    offs = start + cols
                    x = tl.load(x_row + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
                    squares += x * x
                rstd = tl.rsqrt(tl.sum(squares, axis=0) / n_cols + eps)
                tl.store(RSTD + row, rstd)
                for start in range(0, n_cols, BLOCK):
                    offs = start + cols
                    mask = offs < n_cols
                    x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
                    factor = _weight_factor(W, offs, mask, GEMMA)
                    y = _scaled(x * rstd, factor, X.dtype.element_ty, GEMMA)
                    tl.store(y_row + offs, y.to(Y.dtype.element_ty), mask=mask)
                x_row += x_step
                y_row += y_step

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY,  # [n_rows, n_cols] gradient of the output (row stride stride_dy, columns contiguous)
        X,  # [n_rows, n_cols] the forward's input (row stride stride_x)
        W,  # [n_cols] weight
        RSTD,  # fp32 [n_rows] the forward's 1 / rms per row
        DX,  # [n_rows, n_cols] gradient of x in x's dtype (row stride stride_dx), written here
        DW,  # fp32 [n_programs, n_cols] each program's dweight over its rows, written here if WEIGHT_GRAD;
             # zeros on entry when the rows loop over chunks (added to there)
        stride_dy, stride_x, stride_dx, n_rows, n_cols,
        GEMMA: tl.constexpr,  # the Gemma form's (1 + w); else the Llama form
        BLOCK: tl.constexpr,  # columns per chunk (a power of two)
        ONE_BLOCK: tl.constexpr,  # n_cols <= BLOCK: a row is one chunk, read once
        WEIGHT_GRAD: tl.constexpr,  # compute dweight (False for frozen norms)
    ):
        pid = tl.program_id(0)
        n_programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        dy_row = DY + pid.to(tl.int64) * stride_dy  # this program's rows: pid, pid + n_programs, ...
        x_row = X + pid.to(tl.int64) * stride_x
        dx_row = DX + pid.to(tl.int64) * stride_dx
        dy_step = n_programs.to(tl.int64) * stride_dy
        x_step = n_programs.to(tl.int64) * stride_x
        dx_step = n_programs.to(tl.int64) * stride_dx
        dw_row = DW + pid.to(tl.int64) * n_cols
        if ONE_BLOCK:
            in_row = cols < n_cols
            factor = _weight_factor(W, cols, in_row, GEMMA)  # once per program
            dw = tl.zeros([BLOCK], dtype=tl.float32)
            for row in range(pid, n_rows, n_programs):
                x = tl.load(x_row + cols, mask=in_row, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + cols, mask=in_row, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + row)
                normalized = x * rstd
                dn = dy * factor
                mean_dn_n = tl.sum(dn * normalized, axis=0) / n_cols
                dx = rstd * (dn - normalized * mean_dn_n)
                tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=in_row)
                if WEIGHT_GRAD:
                    dw += _weight_grad_term(dy, normalized, X.dtype.element_ty, GEMMA)
                x_row += x_step
                dy_row += dy_step
                dx_row += dx_step
            if WEIGHT_GRAD:
                tl.store(dw_row + cols, dw, mask=in_row)
        else:
            for row in range(pid, n_rows, n_programs):
                rstd = tl.load(RSTD + row)
                dot = tl.zeros([BLOCK], dtype=tl.float32)  # sum(dn * x) over the row, by column slot
                for start in range(0, n_cols, BLOCK):
                    offs = start + cols
                    mask = offs < n_cols
                    x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(dy_row + offs, mask=mask, other=0.0).to(tl.float32)
                    dot += dy * _weight_factor(W, offs, mask, GEMMA) * x
                mean_dn_n = rstd * tl.sum(dot, axis=0) / n_cols
                for start in range(0, n_cols, BLOCK):
                    offs = start + cols
                    mask = offs < n_cols
                    x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(dy_row + offs, mask=mask, other=0.0).to(tl.float32)
                    normalized = x * rstd
                    dn = dy * _weight_factor(W, offs, mask, GEMMA)
                    dx = rstd * (dn - normalized * mean_dn_n)
                    tl.store(dx_row + offs, dx.to(DX.dtype.element_ty), mask=mask)
                    if WEIGHT_GRAD:
                        # This program's own row of DW: no other program touches it. The barrier
                        # makes the store visible to whichever thread loads it for the next row.
                        dw = tl.load(dw_row + offs, mask=mask, other=0.0)
                        dw += _weight_grad_term(dy, normalized, X.dtype.element_ty, GEMMA)
                        tl.store(dw_row + offs, dw, mask=mask)
                        tl.debug_barrier()
                x_row += x_step
                dy_row += dy_step
                dx_row += dx_step

    _jit_interpreted = interpreted(_rms_norm_fwd_kernel)  # the mode @triton.jit chose at this import
else:  # pragma: no cover - depends on the environment
    _jit_interpreted = False


# ---------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------


def _launch_config(n_cols: int, block_size: int | None = None) -> tuple[int, int, int]:
    """(BLOCK, num_warps, num_stages) for rows of n_cols; ``block_size`` overrides BLOCK (tests)."""
    if block_size is None:
        block = max(triton.next_power_of_2(n_cols), 16)
        block = block if block <= _MAX_BLOCK else _CHUNK
    elif block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16; got {block_size}")
    else:
        block = block_size
    # About 16 columns per thread: 2048 -> 4 warps, 8192 -> 16; one warp for short rows.
    num_warps = min(16, max(1, block // 512))
    return block, num_warps, 1  # Triton does not pipeline these row loops: 1 and 3 stages give the same PTX


def _programs(n_rows: int, num_warps: int, device) -> int:
    """How many programs share the rows.

    Each program loops over rows rather than one program per row: the backward's dweight
    partials are then [n_programs, C] rather than [n_rows, C], and the weight is read once
    per program. On a GPU there are enough programs for about _WARPS_PER_SM resident warps
    per SM (memory-bound: the loads of many rows in flight); the interpreter runs each
    program in Python, so there it runs a few.
    """
    if _jit_interpreted:
        return min(n_rows, _INTERPRET_PROGRAMS)
    return min(n_rows, sm_count(device) * max(1, _WARPS_PER_SM // num_warps))


def _gpu_options(num_warps: int, num_stages: int) -> dict:
    return {} if _jit_interpreted else {"num_warps": num_warps, "num_stages": num_stages}


# ---------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------


def _rms_norm_forward(x2, weight, eps: float, gemma: bool, block_size):
    """x2 [rows, C] (columns contiguous) -> (y [rows, C], rstd fp32 [rows])."""
    n_rows, n_cols = x2.shape
    out_dtype = x2.dtype if gemma else torch.promote_types(x2.dtype, weight.dtype)
    y = torch.empty(n_rows, n_cols, device=x2.device, dtype=out_dtype)
    rstd = torch.empty(n_rows, device=x2.device, dtype=torch.float32)
    if n_rows == 0:
        return y, rstd
    block, num_warps, num_stages = _launch_config(n_cols, block_size)
    _rms_norm_fwd_kernel[(_programs(n_rows, num_warps, x2.device),)](
        x2, weight, y, rstd, x2.stride(0), y.stride(0), n_rows, n_cols, float(eps),
        GEMMA=gemma, BLOCK=block, ONE_BLOCK=n_cols <= block, **_gpu_options(num_warps, num_stages),
    )
    return y, rstd


def _rms_norm_backward(dy2, x2, weight, rstd, gemma: bool, weight_grad: bool, block_size):
    """-> (dx [rows, C] in x's dtype, dweight [C] in weight's dtype or None)."""
    n_rows, n_cols = x2.shape
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    dx = torch.empty(n_rows, n_cols, device=x2.device, dtype=x2.dtype)
    if n_rows == 0:
        return dx, torch.zeros_like(weight) if weight_grad else None
    block, num_warps, num_stages = _launch_config(n_cols, block_size)
    one_block = n_cols <= block
    programs = _programs(n_rows, num_warps, x2.device)
    dw_partial = None
    if weight_grad:  # rows in chunks add to their program's row of partials: it starts at zero
        dw_partial = (torch.empty if one_block else torch.zeros)(programs, n_cols, device=x2.device,
                                                                 dtype=torch.float32)
    _rms_norm_bwd_kernel[(programs,)](
        dy2, x2, weight, rstd, dx, dw_partial if weight_grad else rstd,
        dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols,
        GEMMA=gemma, BLOCK=block, ONE_BLOCK=one_block, WEIGHT_GRAD=weight_grad,
        **_gpu_options(num_warps, num_stages),
    )
    dweight = dw_partial.sum(0).to(weight.dtype) if weight_grad else None
    return dx, dweight


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with the fused Triton kernels, forward and backward (dweight only if the weight is trained)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, gemma: bool, block_size):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if weight.stride(0) != 1:
            weight = weight.contiguous()
        with on_device(x):
            y, rstd = _rms_norm_forward(x2, weight, eps, gemma, block_size)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.gemma = gemma
        ctx.block_size = block_size
        ctx.x_shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        with on_device(x2):
            dx, dweight = _rms_norm_backward(dy.reshape(x2.shape), x2, weight, rstd, ctx.gemma,
                                             ctx.needs_input_grad[1], ctx.block_size)
        return dx.view(ctx.x_shape), dweight, None, None, None


def _check_inputs(x, weight):
    if x.dim() == 0 or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be [C] for x [..., C]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise ValueError(f"x and weight must be fp32, fp16 or bf16; got {x.dtype}, {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x and weight must be on one device; got {x.device}, {weight.device}")
    if _jit_interpreted and torch.bfloat16 in (x.dtype, weight.dtype):
        raise ValueError("bf16 runs on the GPU only: the Triton interpreter rounds bf16 wrongly")
    check_cuda("rms_norm", _jit_interpreted, x)


def rms_norm(x, weight, eps: float, gemma: bool = False, *, block_size: int | None = None):
    """Fused RMSNorm of x [..., C] with weight [C]; differentiable in both.

    Llama form: ``weight * normalized.to(x.dtype)`` in the promoted dtype of x and weight;
    Gemma form (``gemma=True``): ``((1 + weight) * normalized).to(x.dtype)``. ``block_size``
    (tests only) caps the columns per chunk, so rows longer than it loop over chunks.
    """
    ok, why = rms_norm_available()
    if not ok:
        raise RuntimeError(f"rms_norm cannot run here: {why}")
    _check_inputs(x, weight)
    return RMSNormFunction.apply(x, weight, float(eps), bool(gemma), block_size)


# ---------------------------------------------------------------------------------------
# Compile report
# ---------------------------------------------------------------------------------------

_W1_ROWS, _W1_HIDDEN = 16384, 2048  # micro-batch 8 x 2048 tokens, TinyLlama's hidden size


def compile_specs(dtype: str) -> list[dict]:
    """Each kernel of this module as a W1 training run launches it, for kernels/compile_report.py.

    W1's norms, Llama form: a LoRA run's x and frozen weight in ``dtype`` (the base's dtype);
    a full fine-tune's x (the fp32 residual stream under autocast) and trained weight in fp32.
    """
    block, num_warps, num_stages = _launch_config(_W1_HIDDEN)
    common = dict(GEMMA=False, BLOCK=block, ONE_BLOCK=_W1_HIDDEN <= block)
    specs = []
    for x_dtype, weight_grad in ((dtype, False), ("fp32", True)):
        x, w, y = f"*{x_dtype}", f"*{x_dtype}", f"*{x_dtype}"  # x and weight share a dtype in both runs
        fwd_args = dict(X=x, W=w, Y=y, RSTD="*fp32", stride_x="i32", stride_y="i32", n_rows="i32", n_cols="i32",
                        eps="fp32")
        bwd_args = dict(DY=y, X=x, W=w, RSTD="*fp32", DX=x, DW="*fp32", stride_dy="i32", stride_x="i32",
                        stride_dx="i32", n_rows="i32", n_cols="i32")
        for name, fn, args, constexprs in (
            ("rms_norm_fwd", _rms_norm_fwd_kernel, fwd_args, common),
            ("rms_norm_bwd", _rms_norm_bwd_kernel, bwd_args, dict(common, WEIGHT_GRAD=weight_grad)),
        ):
            specs.append(dict(
                name=name, fn=fn, signature={**args, **{k: "constexpr" for k in constexprs}},
                constexprs=dict(constexprs), num_warps=num_warps, num_stages=num_stages,
                # contiguous tensors at W1: every pointer, and strides and sizes (2048, 16384) % 16 == 0
                divisible=[n for n in args if n != "eps"],
            ))
    return specs
