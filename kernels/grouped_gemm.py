"""The experts' linear layers of a mixture of experts as one grouped GEMM in Triton, LoRA inside.

Rows ``x`` [M, K] are sorted by expert; ``ends`` int32 [E] holds each expert's cumulative end
row (an expert without rows repeats the previous end). Rows of expert e get
``x W_e^T + b_e + s (x A_e^T) B_e^T`` with ``weight`` [E, N, K], ``bias`` [E, N] and the LoRA
factors ``A`` [E, r, K], ``B`` [E, N, r], all of any strides (gpt-oss stores its weights
[E, K, N] and passes a transposed view).

Forward: one program per (row tile of one expert's group, column tile). The schedule is
computed on the device: every program reads ``ends``, counts each expert's row tiles and finds
its own by a prefix sum, so no count is read back to the host. The grid has the most tiles any
routing can need (``cdiv(M, BLOCK_M) + E``: each group adds at most one partial tile); programs
past the last tile return at once. The LoRA runs in the same K loop: ``x_tile A_e^T`` [BLOCK_M, r]
is accumulated beside ``x_tile W_e^T`` and then multiplied by B_e's column tile, so W + sBA is
never formed. Accumulation is fp32; fp32 inputs multiply in IEEE fp32 (no TF32).

Backward, as the same kernels with the operands' roles swapped (views, no copies):

- dX = dY W_e + s (dY B_e) A_e: the forward kernel with W_e^T, and B_e^T, A_e^T as the LoRA;
- dW_e = dY_e^T X_e and the LoRA's dA_e = s (dY_e B_e)^T X_e, dB_e = s dY_e^T (X_e A_e^T): one
  program per (output tile, expert) sums over the expert's rows (the [M, r] products dY B and
  X A^T come from the forward kernel);
- db_e = the column sums of dY_e.

Each gradient is computed only for an input that requires it.

Public API: :func:`grouped_linear`, :class:`GroupedLinear`, :func:`compile_specs`.
"""

from __future__ import annotations

import torch

from sftplug.kernels.runtime import IMPORT_ERROR, check_runnable, interpreted, on_device, tl, triton

__all__ = ["GroupedLinear", "compile_specs", "grouped_linear"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Tile configs: kernel -> (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). "mm" tiles the rows in
# BLOCK_M and the outputs in BLOCK_N and loops over K; "wgrad" tiles its [P, Q] output in
# BLOCK_N x BLOCK_K and loops over the expert's rows in BLOCK_M; "colsum" tiles the columns in
# BLOCK_N and loops over rows.
_CONFIGS = {
    "hopper": {"mm": (128, 128, 64, 8, 4), "wgrad": (64, 128, 128, 8, 4), "colsum": (32, 128, 0, 4, 1)},
    "ampere": {"mm": (128, 128, 32, 8, 4), "wgrad": (32, 128, 128, 8, 4), "colsum": (32, 128, 0, 4, 1)},
    # the interpreter: small tiles, so small test sizes still span several of them
    "interpreter": {"mm": (16, 32, 16, 1, 1), "wgrad": (16, 32, 16, 1, 1), "colsum": (16, 32, 0, 1, 1)},
}
_MIN_DOT = 16  # tl.dot's least size of each dimension
_POINTERS = {"X", "W", "BIAS", "A", "B", "OUT", "ENDS", "L", "R", "DY"}  # the kernels' tensor arguments


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _row_tile(ENDS, n_experts, tile, BLOCK_M: tl.constexpr, E_BLOCK: tl.constexpr):
        """(expert, first row, end row) of the ``tile``-th row tile; expert >= n_experts past the last."""
        e = tl.arange(0, E_BLOCK)
        real = e < n_experts
        ends = tl.load(ENDS + e, mask=real, other=0)
        starts = tl.load(ENDS + e - 1, mask=real & (e > 0), other=0)
        tiles = tl.where(real, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
        tile_ends = tl.cumsum(tiles, 0)
        expert = tl.sum((tile_ends <= tile).to(tl.int32), 0)  # the experts whose tiles all come before
        first_tile = tl.sum(tl.where(e < expert, tiles, 0), 0)
        start = tl.sum(tl.where(e == expert, starts, 0), 0)
        end = tl.sum(tl.where(e == expert, ends, 0), 0)
        return expert, start + (tile - first_tile) * BLOCK_M, end

    @triton.jit
    def _grouped_mm_kernel(
        X,  # [M, K] rows sorted by expert
        W,  # [E, N, K]: OUT = X W_e^T
        BIAS,  # [E, N] (HAS_BIAS)
        A,  # [E, R, K] LoRA down (HAS_LORA)
        B,  # [E, N, R] LoRA up (HAS_LORA)
        OUT,  # [M, N] written here
        ENDS,  # int32 [E] cumulative end rows
        n_experts, N, K, rank,
        scale,  # the LoRA's scale s
        stride_xm, stride_xk,
        stride_we, stride_wn, stride_wk,
        stride_biase, stride_biasn,
        stride_ae, stride_ar, stride_ak,
        stride_be, stride_bn, stride_br,
        stride_om, stride_on,
        HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
        R_BLOCK: tl.constexpr,  # the rank, padded to a power of two >= 16
        E_BLOCK: tl.constexpr,  # the experts, padded to a power of two
        PRECISION: tl.constexpr,  # tl.dot's input precision: "ieee" for fp32 inputs
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        expert, row0, row_end = _row_tile(ENDS, n_experts, tl.program_id(0), BLOCK_M, E_BLOCK)
        if expert >= n_experts:
            return
        expert = expert.to(tl.int64)
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok, col_ok = rows < row_end, cols < N
        x_ptrs = X + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk
        w_ptrs = W + expert * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk  # W_e^T [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_LORA:
            rs = tl.arange(0, R_BLOCK)
            a_ptrs = A + expert * stride_ae + rs[None, :] * stride_ar + ks[:, None] * stride_ak  # A_e^T [BK, R]
            xa = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = ks < K - k0
            x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
            if HAS_LORA:
                a = tl.load(a_ptrs, mask=k_ok[:, None] & (rs < rank)[None, :], other=0.0)
                xa = tl.dot(x, a, xa, input_precision=PRECISION)
                a_ptrs += BLOCK_K * stride_ak
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        if HAS_LORA:
            b = tl.load(B + expert * stride_be + rs[:, None] * stride_br + cols[None, :] * stride_bn,
                        mask=(rs < rank)[:, None] & col_ok[None, :], other=0.0)  # B_e^T [R, BN]
            # x A^T rounded to the inputs' dtype, as the unfused product is
            acc += scale * tl.dot(xa.to(X.dtype.element_ty), b, input_precision=PRECISION)
        if HAS_BIAS:
            bias = tl.load(BIAS + expert * stride_biase + cols * stride_biasn, mask=col_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        out_ptrs = OUT + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _grouped_wgrad_kernel(
        L,  # [M, P] rows sorted by expert
        R,  # [M, Q]
        OUT,  # [E, P, Q]: OUT_e = scale * L_e^T R_e, written here (zeros for an expert without rows)
        ENDS,  # int32 [E] cumulative end rows
        P, Q,
        scale,
        stride_lm, stride_lp,
        stride_rm, stride_rq,
        stride_oe, stride_op, stride_oq,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # rows, P and Q per step
    ):
        # the output tiles of one expert run one after the other: they read the same rows
        tiles_q = tl.cdiv(Q, BLOCK_K)
        pid_p, pid_q = tl.program_id(0) // tiles_q, tl.program_id(0) % tiles_q
        expert = tl.program_id(1)
        start = tl.load(ENDS + expert - 1, mask=expert > 0, other=0)
        end = tl.load(ENDS + expert)
        ps = pid_p * BLOCK_N + tl.arange(0, BLOCK_N)
        qs = pid_q * BLOCK_K + tl.arange(0, BLOCK_K)
        ms = tl.arange(0, BLOCK_M)
        p_ok, q_ok = ps < P, qs < Q
        l_ptrs = L + (start + ms).to(tl.int64)[None, :] * stride_lm + ps[:, None] * stride_lp  # L^T [BN, BM]
        r_ptrs = R + (start + ms).to(tl.int64)[:, None] * stride_rm + qs[None, :] * stride_rq  # [BM, BK]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            m_ok = ms < end - m0
            lt = tl.load(l_ptrs, mask=p_ok[:, None] & m_ok[None, :], other=0.0)
            r = tl.load(r_ptrs, mask=m_ok[:, None] & q_ok[None, :], other=0.0)
            acc = tl.dot(lt, r, acc, input_precision=PRECISION)
            l_ptrs += BLOCK_M * stride_lm
            r_ptrs += BLOCK_M * stride_rm
        out_ptrs = OUT + expert.to(tl.int64) * stride_oe + ps[:, None] * stride_op + qs[None, :] * stride_oq
        tl.store(out_ptrs, (scale * acc).to(OUT.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])

    @triton.jit
    def _grouped_colsum_kernel(
        DY,  # [M, N] rows sorted by expert
        OUT,  # [E, N]: each expert's column sums, written here
        ENDS,  # int32 [E] cumulative end rows
        N,
        stride_dm, stride_dn,
        stride_oe, stride_on,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        expert = tl.program_id(1)
        start = tl.load(ENDS + expert - 1, mask=expert > 0, other=0)
        end = tl.load(ENDS + expert)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ms = tl.arange(0, BLOCK_M)
        col_ok = cols < N
        ptrs = DY + (start + ms).to(tl.int64)[:, None] * stride_dm + cols[None, :] * stride_dn
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            dy = tl.load(ptrs, mask=(ms < end - m0)[:, None] & col_ok[None, :], other=0.0)
            acc += tl.sum(dy.to(tl.float32), 0)
            ptrs += BLOCK_M * stride_dm
        tl.store(OUT + expert.to(tl.int64) * stride_oe + cols * stride_on, acc.to(OUT.dtype.element_ty),
                 mask=col_ok)

    _jit_interpreted = interpreted(_grouped_mm_kernel)  # the mode @triton.jit chose at this import
    _FP_FUSION = {} if _jit_interpreted else {"enable_fp_fusion": True}
else:  # pragma: no cover - depends on the environment
    _jit_interpreted = False


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------


def _config(kernel: str, device: torch.device, width: int) -> tuple[int, int, int, int, int]:
    """The tile config of ``kernel`` on ``device``, its BLOCK_N narrowed to an output ``width``
    below it (the LoRA's r-wide products)."""
    if device.type != "cuda":
        target = "interpreter"
    else:
        target = "hopper" if torch.cuda.get_device_capability(device) >= (9, 0) else "ampere"
    block_m, block_n, block_k, warps, stages = _CONFIGS[target][kernel]
    return block_m, _narrowed(block_n, width), block_k, warps, stages


def _narrowed(block: int, width: int) -> int:
    return max(_MIN_DOT, min(block, triton.next_power_of_2(max(width, 1))))


def _precision(dtype: torch.dtype | None) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for fp16 / bf16 inputs


def _rank_block(rank: int) -> int:
    return max(_MIN_DOT, triton.next_power_of_2(rank))


def _mm(x, ends, weight, bias=None, lora=None, out_dtype=None):
    """[M, N]: rows of expert e times W_e^T (+ b_e, + s (x A_e^T) B_e^T) in fp32, rounded once."""
    n_rows, n_experts, n_out, n_in = x.shape[0], weight.shape[0], weight.shape[1], weight.shape[2]
    out = torch.empty(n_rows, n_out, dtype=out_dtype or x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_m, block_n, block_k, warps, stages = _config("mm", x.device, n_out)
    a, b, scale = lora if lora is not None else (None, None, 0.0)
    rank = a.shape[1] if a is not None else 0
    dummy = x  # never read: a constexpr switches its loads off
    grid = (triton.cdiv(n_rows, block_m) + n_experts, triton.cdiv(n_out, block_n))
    _grouped_mm_kernel[grid](
        x, weight, bias if bias is not None else dummy, a if a is not None else dummy,
        b if b is not None else dummy, out, ends, n_experts, n_out, n_in, rank, float(scale),
        *x.stride(), *weight.stride(), *(bias.stride() if bias is not None else (0, 0)),
        *(a.stride() if a is not None else (0, 0, 0)), *(b.stride() if b is not None else (0, 0, 0)),
        *out.stride(), HAS_BIAS=bias is not None, HAS_LORA=lora is not None, R_BLOCK=_rank_block(rank),
        E_BLOCK=triton.next_power_of_2(n_experts), PRECISION=_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages, **_FP_FUSION)
    return out


def _wgrad(left, right, ends, out, scale: float = 1.0):
    """Fill ``out`` [E, P, Q] with scale * left_e^T right_e (left [M, P], right [M, Q]); returns it."""
    n_experts, p, q = out.shape
    block_m, block_n, block_k, warps, stages = _config("wgrad", left.device, p)
    block_k = _narrowed(block_k, q)
    grid = (triton.cdiv(p, block_n) * triton.cdiv(q, block_k), n_experts)
    if out.numel():
        _grouped_wgrad_kernel[grid](
            left, right, out, ends, p, q, float(scale), *left.stride(), *right.stride(), *out.stride(),
            PRECISION=_precision(left.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=warps, num_stages=stages, **_FP_FUSION)
    return out


def _column_sums(dy, ends, n_experts: int, dtype: torch.dtype):
    """[E, N]: the column sums of each expert's rows of dy, in fp32, rounded to ``dtype``."""
    out = torch.empty(n_experts, dy.shape[1], dtype=dtype, device=dy.device)
    if out.numel():
        block_m, block_n, _, warps, stages = _config("colsum", dy.device, dy.shape[1])
        _grouped_colsum_kernel[(triton.cdiv(dy.shape[1], block_n), n_experts)](
            dy, out, ends, dy.shape[1], *dy.stride(), *out.stride(), BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=warps, num_stages=stages)
    return out


class GroupedLinear(torch.autograd.Function):
    """The grouped linear layer with the Triton kernels; lora_a and lora_b are None without a LoRA."""

    @staticmethod
    def forward(ctx, x, ends, weight, bias, lora_a, lora_b, scale: float):
        lora = (lora_a, lora_b, scale) if lora_a is not None else None
        out_dtype = torch.promote_types(x.dtype, bias.dtype) if bias is not None else x.dtype
        with on_device(x):
            out = _mm(x, ends, weight, bias, lora, out_dtype)
        ctx.save_for_backward(x, ends, weight, lora_a, lora_b)
        ctx.scale, ctx.bias_dtype = scale, bias.dtype if bias is not None else None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, ends, weight, a, b = ctx.saved_tensors
        need_x, _, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        n_experts, s = weight.shape[0], ctx.scale
        dx = dw = dbias = da = db = None
        with on_device(x):
            if need_bias:  # from dY as it comes: the bias may be wider than the products
                dbias = _column_sums(dy, ends, n_experts, ctx.bias_dtype)
            dy = dy.to(x.dtype)
            if need_x:  # dY W_e + s (dY B_e) A_e: the forward with the roles transposed
                lora = (b.transpose(1, 2), a.transpose(1, 2), s) if a is not None else None
                dx = _mm(dy, ends, weight.transpose(1, 2), None, lora)
            if need_w:  # dY_e^T X_e, in the weight's own layout (gpt-oss's transposed storage stays so)
                dw = _wgrad(dy, x, ends, torch.empty_like(weight))
            if need_a:  # s (dY_e B_e)^T X_e, computed as its transpose: K is the long side
                da = torch.empty_like(a)
                _wgrad(x, _mm(dy, ends, b.transpose(1, 2)), ends, da.transpose(1, 2), s)
            if need_b:  # s dY_e^T (X_e A_e^T)
                db = _wgrad(dy, _mm(x, ends, a), ends, torch.empty_like(b), s)
        return dx, None, dw, dbias, da, db, None


def grouped_linear(x, ends, weight, bias=None, lora=None):
    """x [M, K] rows sorted by expert -> [M, N]: rows of expert e get x W_e^T + b_e + s (x A_e^T) B_e^T.

    ``ends`` int32 [E]: each expert's cumulative end row (the last is M); ``weight`` [E, N, K],
    ``bias`` [E, N] or None, ``lora`` None or (A [E, r, K], B [E, N, r], s), any strides.
    Under autocast x, the weight and the LoRA are cast to its dtype. Differentiable with respect
    to x, weight, bias, A and B. Under TRITON_INTERPRET=1 bf16 rounds wrongly: test fp32 / fp16.
    """
    if torch.is_autocast_enabled(x.device.type):  # as the PyTorch form: the products in autocast's dtype
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        lora = None if lora is None else (lora[0].to(dtype), lora[1].to(dtype), lora[2])
    _check(x, ends, weight, bias, lora)
    check_runnable("the Triton grouped GEMM", __name__, _jit_interpreted, x)
    a, b, scale = lora if lora is not None else (None, None, 0.0)
    with torch.autocast(x.device.type, enabled=False):
        return GroupedLinear.apply(x, ends, weight, bias, a, b, float(scale))


def _check(x, ends, weight, bias, lora) -> None:
    if x.dim() != 2 or weight.dim() != 3 or weight.shape[2] != x.shape[1]:
        raise ValueError(f"x [M, K] and weight [E, N, K] do not fit: {tuple(x.shape)}, {tuple(weight.shape)}")
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must be one of fp32, fp16, bf16; got {x.dtype} and {weight.dtype}")
    n_experts, n_out, n_in = weight.shape
    if ends.dtype != torch.int32 or tuple(ends.shape) != (n_experts,):
        raise ValueError(f"ends must be int32 [{n_experts}]; got {ends.dtype} {tuple(ends.shape)}")
    if bias is not None and (tuple(bias.shape) != (n_experts, n_out) or bias.dtype not in _DTYPES):
        raise ValueError(f"bias must be [{n_experts}, {n_out}] fp32, fp16 or bf16; got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    if lora is not None:
        a, b, _ = lora
        rank = a.shape[1] if a.dim() == 3 else -1
        if tuple(a.shape) != (n_experts, rank, n_in) or tuple(b.shape) != (n_experts, n_out, rank):
            raise ValueError(f"the LoRA must be A [{n_experts}, r, {n_in}] and B [{n_experts}, {n_out}, r]; got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        if a.dtype != x.dtype or b.dtype != x.dtype:
            raise ValueError(f"the LoRA's A and B must be {x.dtype} as x; got {a.dtype} and {b.dtype}")


# ---------------------------------------------------------------------------------------
# Compile report
# ---------------------------------------------------------------------------------------


def compile_specs(dtype: str) -> list[dict]:
    """Each kernel of this module as an MoE training run launches it, on each target at that
    target's config, for kernels/compile_report.py (each spec names its ``targets``).

    Sizes (K, N: 768, 2048, 4096 ...; r: 16) enter only as multiples of 16 and through the
    output width, which narrows BLOCK_N for the r-wide LoRA products; a stride of 1 is a
    constant, as Triton specializes it at launch, so each layout of the weight (K or N
    contiguous: [E, N, K] storage, or gpt-oss's [E, K, N] seen transposed; the backward's dX
    runs the other) compiles apart.
    """
    if triton is None:
        raise RuntimeError(f"triton is not importable ({IMPORT_ERROR})")
    specs = []
    for target, configs in (("sm_80", _CONFIGS["ampere"]), ("sm_90a", _CONFIGS["hopper"])):
        block_m, block_n, block_k, warps, stages = configs["mm"]
        rank_block = _rank_block(16)
        for layout in ("k", "n"):
            unit = {"stride_xk": 1, f"stride_w{layout}": 1, "stride_on": 1}
            # contiguous A [E, r, K] and B [E, N, r]; dX reads them as B^T [E, r, N] and A^T [E, K, r]
            lora_unit = {"stride_ak": 1, "stride_br": 1} if layout == "k" else {"stride_ar": 1, "stride_bn": 1}
            for lora in (False, True):  # with the bias (gpt-oss) and with a LoRA (its backward: dX has no bias)
                extra = lora_unit if lora else {"stride_biasn": 1}
                specs.append(_mm_spec(f"grouped_mm_{layout}" + ("_lora" if lora else ""), target, dtype,
                                      {**unit, **extra}, lora, bias=not lora, blocks=(block_m, block_n, block_k),
                                      warps=warps, stages=stages))
            # the r-wide products of the LoRA's backward: X A_e^T (A K-contiguous), dY B_e (B^T N-contiguous)
            specs.append(_mm_spec(f"grouped_mm_{layout}_rank", target, dtype, unit, lora=False, bias=False,
                                  blocks=(block_m, rank_block, block_k), warps=warps, stages=stages))
        block_m, block_n, block_k, warps, stages = configs["wgrad"]
        wgrads = {"grouped_wgrad_k": ({"stride_oq": 1}, block_k),  # dW_e in [E, N, K] storage
                  "grouped_wgrad_n": ({"stride_op": 1}, block_k),  # ... in gpt-oss's [E, K, N]
                  "grouped_wgrad_da": ({"stride_op": 1}, rank_block),  # dA_e^T [K, r] of A [E, r, K]
                  "grouped_wgrad_db": ({"stride_oq": 1}, rank_block)}  # dB_e [N, r]
        for name, (unit, q_block) in wgrads.items():
            constexprs = {"stride_lp": 1, "stride_rq": 1, **unit, "PRECISION": _precision(None),
                          "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": q_block}
            specs.append(_spec(name, _grouped_wgrad_kernel, target, dtype, constexprs, warps, stages, wgmma=True))
        block_m, block_n, _, warps, stages = configs["colsum"]
        constexprs = {"stride_dn": 1, "stride_on": 1, "BLOCK_M": block_m, "BLOCK_N": block_n}
        specs.append(_spec("grouped_colsum", _grouped_colsum_kernel, target, dtype, constexprs, warps, stages,
                           wgmma=False))
    return specs


def _mm_spec(name, target, dtype, unit, lora, bias, blocks, warps, stages) -> dict:
    block_m, block_n, block_k = blocks
    constexprs = {**unit, "HAS_BIAS": bias, "HAS_LORA": lora, "R_BLOCK": _rank_block(16), "E_BLOCK": 128,
                  "PRECISION": _precision(None), "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
    return _spec(name, _grouped_mm_kernel, target, dtype, constexprs, warps, stages, wgmma=True)


def _spec(name, fn, target, dtype, constexprs, warps, stages, wgmma: bool) -> dict:
    """The compile report's description of one launch: the tensors (ENDS int32), the LoRA's scale
    fp32, every other argument i32; all divisible by 16 but the scale and the expert and rank counts."""
    signature, divisible = {}, []
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
            continue
        signature[arg] = ("*i32" if arg == "ENDS" else "*" + dtype) if arg in _POINTERS else (
            "fp32" if arg == "scale" else "i32")
        if arg not in ("scale", "n_experts", "rank"):
            divisible.append(arg)
    blocks = "x".join(str(constexprs[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if b in constexprs)
    switches = [k.removeprefix("HAS_").lower() for k in ("HAS_BIAS", "HAS_LORA") if constexprs.get(k)]
    unit = ",".join(k.removeprefix("stride_") for k in constexprs if k.startswith("stride_"))
    return dict(name=name, fn=fn, signature=signature, constexprs=constexprs, num_warps=warps,
                num_stages=stages, divisible=divisible, targets=[target], wgmma=wgmma,
                detail=" ".join([blocks, *switches, f"unit={unit}"]))
