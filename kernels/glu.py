"""The gated MLP activation in Triton: ``act(gate) * up`` from one fused ``gate_up`` projection.

``gate_up`` [..., 2I] holds the gate in its first half and up in its second (sftplug's MLP
projects with one ``gate_up`` linear). Activations: "silu" (SwiGLU) and "gelu_tanh"
(GeGLU as in Gemma). Both are ``x * sigmoid(z(x))``: z = x for SiLU, and for tanh-GELU
z = 2 sqrt(2/pi) (x + 0.044715 x^3), since 0.5 (1 + tanh(u)) = sigmoid(2u). Everything is
computed in fp32 and rounded once.

Forward: one program per (row, block of columns) reads gate and up and writes the output.
Backward: the activation is recomputed from the saved ``gate_up`` (nothing else is kept),
and d(gate) | d(up) overwrite that buffer in place, which becomes the gradient: no
[..., I] activation is stored and no [..., 2I] gradient is allocated (Liger-Kernel's
SwiGLU makes the same saving).

Public API: :func:`glu`, :func:`glu_reference`, :func:`compile_specs`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sftplug.kernels.runtime import IMPORT_ERROR, check_runnable, interpreted, on_device, tl, triton

__all__ = ["ACTIVATIONS", "GLU", "compile_specs", "glu", "glu_reference"]

ACTIVATIONS = ("silu", "gelu_tanh")
_GELU_SCALE = 2.0 * math.sqrt(2.0 / math.pi)  # 0.5 (1 + tanh(u)) = sigmoid(2u): the sigmoid's argument is 2u
_GELU_CUBIC = 0.044715
_W1_INTERMEDIATE = 5632  # W1's intermediate size (gate_up [16384, 11264])


# ---------------------------------------------------------------------------------------
# Plain-PyTorch reference
# ---------------------------------------------------------------------------------------


def glu_reference(gate_up, activation: str = "silu"):
    """``act(gate) * up`` in plain PyTorch, in gate_up's dtype; gate, up = gate_up.chunk(2, -1)."""
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown activation {activation!r} (known: {', '.join(ACTIVATIONS)})")


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------

if triton is not None:

    _Z_SCALE = tl.constexpr(_GELU_SCALE)  # jit functions may only read constexpr globals
    _Z_CUBIC = tl.constexpr(_GELU_CUBIC)

    @triton.jit
    def _sigmoid_argument(gate, GELU_TANH: tl.constexpr):
        """z(gate) with act(gate) = gate * sigmoid(z), and dz/dgate (fp32)."""
        if GELU_TANH:
            gate2 = gate * gate
            z = _Z_SCALE * gate * (1.0 + _Z_CUBIC * gate2)
            dz = _Z_SCALE * (1.0 + 3.0 * _Z_CUBIC * gate2)
        else:
            z = gate
            dz = tl.full(gate.shape, 1.0, tl.float32)
        return z, dz

    @triton.jit
    def _glu_fwd_kernel(
        GATE_UP,  # [N, 2I] input: gate | up in each row (last dim contiguous)
        OUT,  # [N, I] output act(gate) * up, contiguous, written here
        stride_gu_row,  # elements between rows of GATE_UP
        n_cols,  # I
        GELU_TANH: tl.constexpr,  # False: SiLU
        BLOCK: tl.constexpr,  # columns per program
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate_ptrs = GATE_UP + row * stride_gu_row + cols
        gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_ptrs + n_cols, mask=mask, other=0.0).to(tl.float32)
        z, _ = _sigmoid_argument(gate, GELU_TANH)
        out = gate * tl.sigmoid(z) * up
        tl.store(OUT + row * n_cols + cols, out.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_bwd_kernel(
        GATE_UP,  # [N, 2I] the forward's input, read, then overwritten by d(gate) | d(up)
        DOUT,  # [N, I] gradient of the output (last dim contiguous)
        stride_gu_row,  # elements between rows of GATE_UP
        stride_dout_row,  # elements between rows of DOUT
        n_cols,  # I
        GELU_TANH: tl.constexpr,  # False: SiLU
        BLOCK: tl.constexpr,  # columns per program
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate_ptrs = GATE_UP + row * stride_gu_row + cols
        gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_ptrs + n_cols, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + row * stride_dout_row + cols, mask=mask, other=0.0).to(tl.float32)
        z, dz = _sigmoid_argument(gate, GELU_TANH)
        s = tl.sigmoid(z)
        act = gate * s
        d_act = s + act * (1.0 - s) * dz  # d(gate * sigmoid(z)) / d(gate)
        # Each program reads its elements before it writes them, and no program touches
        # another's, so overwriting the input in place is race-free.
        tl.store(gate_ptrs, (dout * up * d_act).to(GATE_UP.dtype.element_ty), mask=mask)
        tl.store(gate_ptrs + n_cols, (dout * act).to(GATE_UP.dtype.element_ty), mask=mask)

    _jit_interpreted = interpreted(_glu_fwd_kernel)  # the mode @triton.jit chose at this import
    _FP_FUSION = {} if _jit_interpreted else {"enable_fp_fusion": True}  # a * b + c as one FMA, as compiled
else:  # pragma: no cover - depends on the environment
    _jit_interpreted = False


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------


def _glu_config(n_cols: int, block_size: int | None = None) -> tuple[int, int, int]:
    """(BLOCK, num_warps, num_stages) for rows of ``n_cols`` outputs: up to 1024 columns per
    program, 8 per thread (16-byte loads of fp16 / bf16); no loop, so one stage."""
    block = block_size or min(triton.next_power_of_2(max(n_cols, 1)), 1024)
    return block, max(1, min(4, block // 256)), 1


def _glu_forward(rows, gelu_tanh: bool, block_size: int | None):
    """rows [N, 2I] -> [N, I]."""
    n_rows, n_cols = rows.shape[0], rows.shape[1] // 2
    out = torch.empty(n_rows, n_cols, dtype=rows.dtype, device=rows.device)
    if out.numel():
        block, warps, stages = _glu_config(n_cols, block_size)
        _glu_fwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
            rows, out, rows.stride(0), n_cols, GELU_TANH=gelu_tanh, BLOCK=block, num_warps=warps,
            num_stages=stages, **_FP_FUSION)
    return out


def _glu_backward(rows, dout, gelu_tanh: bool, block_size: int | None):
    """Overwrite rows [N, 2I] with d(gate) | d(up) for dout [N, I]."""
    n_rows, n_cols = rows.shape[0], rows.shape[1] // 2
    if dout.numel():
        block, warps, stages = _glu_config(n_cols, block_size)
        _glu_bwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
            rows, dout, rows.stride(0), dout.stride(0), n_cols, GELU_TANH=gelu_tanh, BLOCK=block,
            num_warps=warps, num_stages=stages, **_FP_FUSION)


class GLU(torch.autograd.Function):
    """act(gate) * up with the Triton kernels; the backward reuses the saved input's memory."""

    @staticmethod
    def forward(ctx, gate_up, activation: str, block_size):
        shape = gate_up.shape
        rows = gate_up.reshape(-1, shape[-1])  # a view wherever the leading dims allow it
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        with on_device(rows):
            out = _glu_forward(rows, activation == "gelu_tanh", block_size)
        # The backward overwrites `rows` with the gradient. That is safe when this op is the
        # only user of the buffer: sftplug's gate_up linear keeps its input and weight, not its
        # output, and nothing else reads gate_up. A buffer the caller holds (a leaf) or one whose
        # rows overlap is copied first instead.
        ctx.copy_first = rows.data_ptr() == gate_up.data_ptr() and (
            gate_up.is_leaf or (rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]))
        ctx.save_for_backward(rows)
        ctx.shape, ctx.gelu_tanh, ctx.block_size = shape, activation == "gelu_tanh", block_size
        return out.view(*shape[:-1], shape[-1] // 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        (rows,) = ctx.saved_tensors
        if ctx.copy_first:
            rows = rows.clone(memory_format=torch.contiguous_format)
        else:
            # Anything else that saved this buffer would now read a gradient: bump its version so
            # autograd raises there (and on a second backward through this graph) instead.
            torch.autograd.graph.increment_version(rows)
        dout = dout.reshape(rows.shape[0], rows.shape[1] // 2)
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        with on_device(rows):
            _glu_backward(rows, dout, ctx.gelu_tanh, ctx.block_size)
        return rows.view(ctx.shape), None, None


def glu(gate_up, activation: str = "silu", *, block_size: int | None = None):
    """``act(gate) * up`` [..., I] in gate_up's dtype, for ``gate_up`` [..., 2I] (gate first).

    ``activation``: "silu" or "gelu_tanh". Differentiable; the backward writes the gradient
    into gate_up's own memory (see :class:`GLU`), so gate_up must not be read after it.
    ``block_size``: columns per program (a power of two), for tests; default by row length.
    Under TRITON_INTERPRET=1 bf16 rounds differently (Triton's interpreter): test fp32 / fp16.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r} (known: {', '.join(ACTIVATIONS)})")
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even (gate | up); got shape {tuple(gate_up.shape)}")
    if gate_up.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"gate_up must be fp16, bf16 or fp32; got {gate_up.dtype}")
    if block_size is not None and (block_size < 1 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be a power of two; got {block_size}")
    check_runnable("the Triton GLU", __name__, _jit_interpreted, gate_up)
    return GLU.apply(gate_up, activation, block_size)


# ---------------------------------------------------------------------------------------
# Compile report
# ---------------------------------------------------------------------------------------


def compile_specs(dtype: str) -> list[dict]:
    """Each kernel of this module as a W1 training run launches it, for kernels/compile_report.py."""
    if triton is None:
        raise RuntimeError(f"triton is not importable ({IMPORT_ERROR})")
    block, warps, stages = _glu_config(_W1_INTERMEDIATE)
    pointer = "*" + dtype
    specs = []
    for activation in ACTIVATIONS:
        constexprs = {"GELU_TANH": activation == "gelu_tanh", "BLOCK": block}
        specs.append(dict(
            name=f"glu_{activation}_fwd", fn=_glu_fwd_kernel,
            signature={"GATE_UP": pointer, "OUT": pointer, "stride_gu_row": "i32", "n_cols": "i32",
                       "GELU_TANH": "constexpr", "BLOCK": "constexpr"},
            constexprs=constexprs, num_warps=warps, num_stages=stages,
            divisible=["GATE_UP", "OUT", "stride_gu_row", "n_cols"]))
        specs.append(dict(
            name=f"glu_{activation}_bwd", fn=_glu_bwd_kernel,
            signature={"GATE_UP": pointer, "DOUT": pointer, "stride_gu_row": "i32", "stride_dout_row": "i32",
                       "n_cols": "i32", "GELU_TANH": "constexpr", "BLOCK": "constexpr"},
            constexprs=constexprs, num_warps=warps, num_stages=stages,
            divisible=["GATE_UP", "DOUT", "stride_gu_row", "stride_dout_row", "n_cols"]))
    return specs
