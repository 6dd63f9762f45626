"""Fused causal / packed-document attention in Triton (FlashAttention-2 style).

Forward: one program per (query block, batch * query head) streams over the key blocks
its rows may see, with an online softmax in base 2 (log2(e) folded into the scale) and
fp32 accumulators; it stores the output and the per-row log-sum-exp (base 2).

Backward: a preprocessing kernel computes ``delta = rowsum(dO * O)``; then one kernel
computes dK and dV (one program per (key block, batch * kv head), looping over the
query heads of its GQA group, so there are no atomics and K/V are never repeated; when
batch * kv heads is too small to fill the GPU the group is split over a few programs
whose fp32 partial sums are added afterwards) and one kernel computes dQ (one program
per (query block, batch * query head)).

On a GPU the block sizes, warps and stages are autotuned over a small candidate set per
head dim (keyed by head dim, a power-of-two length bucket and causality), cached on disk
across runs; SFTPLUG_TRITON_TUNE=0 takes the first candidate without tuning. Every
candidate compiles for sm_80 and sm_90a without spills (sftplug.kernels.compile_report).
Under TRITON_INTERPRET=1 one fixed 16 x 16 configuration is used.

Which keys a query row sees is a contiguous range ``[lo, hi)``: the row's document
(or the whole row), cut at the diagonal when causal and, with a sliding window W, at
i - W + 1 below. Every program reduces the ranges of its rows to a block schedule:
masked blocks before, unmasked blocks in the middle (no mask arithmetic at all), masked
blocks after; blocks outside every range (other documents, keys behind the window) are
never visited. Without ``doc_ids`` or a window the ranges are computed in the kernel;
otherwise the host computes them once per call with a few torch ops (no device sync).

Soft-capping (Gemma 2) turns the scaled scores s into c * tanh(s / c) before the
softmax, on the natural scale (then the log2(e) factor); it is a constexpr switch, so
the kernels without it are unchanged. tanh(x) = 2 sigmoid(2x) - 1, and the backward's
1 - tanh^2 = 4 sigmoid (1 - sigmoid) stays accurate where tanh saturates.

Attention sinks (gpt-oss) are one logit s_h per query head in the softmax's denominator
only: the forward adds exp2(s_h log2(e) - m) to each row's running sum after the key loop
(a constexpr switch), so the stored log-sum-exp includes it and P = exp2(S - lse) in the
backward kernels is already right. A sink is a key whose value is 0, so rowsum(dO * O) is
unchanged, and its gradient -sum_i P_sink_i * rowsum(dO * O)_i is a few torch ops on the host.

Public API: :func:`triton_attention`, :func:`triton_attention_available`,
:func:`attention_reference`.
"""

from __future__ import annotations

import math
import os

import torch

from sftplug.kernels.runtime import check_cuda, interpreted, on_device, sm_count, tl, triton, triton_available

__all__ = ["HEAD_DIMS", "attention_reference", "candidate_configs", "kernel_of", "triton_attention",
           "triton_attention_available", "TritonAttention"]

_LOG2E = 1.4426950408889634
_BIG = 1 << 30  # larger than any sequence length; neutral element for the range reductions
HEAD_DIMS = (16, 32, 64, 128, 256)
_INTERPRET_BLOCK = 16  # the one fixed block size used under TRITON_INTERPRET=1


def triton_attention_available() -> tuple[bool, str]:
    """Whether the kernel can run here, and why (or why not)."""
    return triton_available(__name__, _jit_interpreted)


# ---------------------------------------------------------------------------------------
# Plain-PyTorch reference
# ---------------------------------------------------------------------------------------


def _allowed_mask(T: int, device, causal: bool, doc_ids, window: int = 0) -> torch.Tensor:
    """[B or 1, 1, T, T] bool: query t may attend key s."""
    allowed = torch.ones(T, T, dtype=torch.bool, device=device)
    if causal:
        allowed = torch.tril(allowed)
    if window:
        allowed = torch.triu(allowed, diagonal=1 - window)  # s > t - window
    allowed = allowed[None, None]
    if doc_ids is not None:
        ids = doc_ids.to(device)
        same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)  # [B, T, T]
        allowed = allowed & same[:, None]
    return allowed


def attention_reference(q, k, v, *, causal=True, scale=None, doc_ids=None, window=0, softcap=0.0, sinks=None):
    """Attention in plain PyTorch, in the inputs' dtype: explicit mask, K/V repeated for GQA.

    q: [B, Hq, T, D]; k, v: [B, Hkv, T, D]; doc_ids: optional [B, T], equal ids attend each
    other, negative ids are padding. ``window`` W > 0: query t sees keys t - W < s <= t.
    ``softcap`` c > 0: scores s become c * tanh(s / c). ``sinks`` [Hq]: head h's logit joins
    the softmax as one more column whose value is 0 (gpt-oss). Rows that may attend nothing
    give 0 (and 0 gradients).
    """
    B, Hq, T, D = q.shape
    group = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(group, dim=1)  # [B, Hq, T, D]
    v = v.repeat_interleave(group, dim=1)  # [B, Hq, T, D]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hq, T, T]
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = _allowed_mask(T, q.device, causal, doc_ids, window)  # [B|1, 1, T, T]
    if sinks is not None:  # an empty row's softmax is all sink: no NaN, output 0
        scores = scores.masked_fill(~allowed, float("-inf"))
        sink = sinks.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:3], 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
        return torch.matmul(probs, v)
    row_any = allowed.any(dim=-1, keepdim=True)  # [B|1, 1, T, 1]
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~row_any, 0.0)
    probs = torch.softmax(scores, dim=-1) * row_any  # empty rows: all zero, no NaN
    return torch.matmul(probs, v)  # [B, Hq, T, D]


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------

if triton is not None:

    _RANGE_INF = tl.constexpr(_BIG)  # jit functions may only read constexpr globals
    _LOG2E_C = tl.constexpr(_LOG2E)

    @triton.jit
    def _softcap_sigmoid(qk, sm_scale, softcap):
        """sigmoid(2 s / c) of the natural-scale scores s = sm_scale * qk: tanh(s / c) = 2 sigmoid - 1."""
        # As tl.sigmoid, the scale folded into exp2's argument ("/" is div.full.f32: IEEE division spills)
        return 1.0 / (1.0 + tl.exp2(qk * (-2.0 * _LOG2E_C * sm_scale / softcap)))

    @triton.jit
    def _log2_scores(qk, qk_scale, sm_scale, softcap, SOFTCAP: tl.constexpr):
        """The scores in log2 units: s * log2(e), with s soft-capped to c * tanh(s / c) first if SOFTCAP."""
        if SOFTCAP:
            s = (2.0 * _softcap_sigmoid(qk, sm_scale, softcap) - 1.0) * (softcap * _LOG2E_C)
        else:
            s = qk * qk_scale
        return s

    @triton.jit
    def _attn_ranges(
        ranges_ptr,  # int32 [B, 4, T]: query lo, query hi, key lo, key hi (only if HAS_DOCS)
        off_b,
        offs,  # int32 [BLOCK]: token positions of this block's rows (or keys)
        T,
        CAUSAL: tl.constexpr,
        HAS_DOCS: tl.constexpr,
        KEY_SIDE: tl.constexpr,  # False: keys a query row sees; True: queries that see a key
    ):
        """[lo, hi) per row of the block, and which rows are real (in range and not padding)."""
        in_seq = offs < T
        if HAS_DOCS:
            base = ranges_ptr + off_b.to(tl.int64) * 4 * T + (2 * T if KEY_SIDE else 0)
            lo = tl.load(base + offs, mask=in_seq, other=0)
            hi = tl.load(base + T + offs, mask=in_seq, other=0)
        else:
            if KEY_SIDE:
                lo = offs if CAUSAL else tl.zeros_like(offs)
                hi = tl.zeros_like(offs) + T
            else:
                lo = tl.zeros_like(offs)
                hi = offs + 1 if CAUSAL else tl.zeros_like(offs) + T
        valid = in_seq & (hi > lo)
        return lo, hi, valid

    @triton.jit
    def _load_kv_block(
        k_base,  # K of this (batch, kv head), row 0
        v_base,  # V of this (batch, kv head), row 0
        offs_n, offs_d, stride_kt, stride_vt, T,
        MASKED: tl.constexpr,  # the block may run past T
    ):
        """K and V rows offs_n of one head, [BLOCK_N, D] each (zeros past T)."""
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=(offs_n < T)[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=(offs_n < T)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        return k, v

    @triton.jit
    def _attn_schedule(lo, hi, valid, BLOCK: tl.constexpr):
        """Reduce per-row ranges to [start, a) masked, [a, b) unmasked, [b, end) masked."""
        span_lo = tl.min(tl.where(valid, lo, _RANGE_INF), axis=0)  # first position any row sees
        span_hi = tl.max(tl.where(valid, hi, 0), axis=0)  # one past the last
        full_lo = tl.max(tl.where(valid, lo, 0), axis=0)  # positions every row sees
        full_hi = tl.min(tl.where(valid, hi, _RANGE_INF), axis=0)
        n_total = tl.cdiv(tl.maximum(span_hi - span_lo, 0), BLOCK)
        n_lead = tl.minimum(tl.cdiv(tl.maximum(full_lo - span_lo, 0), BLOCK), n_total)
        a = span_lo + n_lead * BLOCK
        n_full = tl.minimum(tl.maximum(full_hi - a, 0) // BLOCK, n_total - n_lead)
        b = a + n_full * BLOCK
        end = span_lo + n_total * BLOCK
        return span_lo, a, b, end

    @triton.jit
    def _attn_fwd_inner(
        acc, l_i, m_i, q,
        k_base,  # K of this (batch, kv head), row 0
        v_base,  # V of this (batch, kv head), row 0
        stride_kt, stride_vt,
        lo, hi,  # int32 [BLOCK_M]: key range of each query row
        start, end, T, qk_scale, sm_scale, softcap,
        offs_d,
        BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr,
        SOFTCAP: tl.constexpr,
    ):
        offs_n0 = tl.arange(0, BLOCK_N)
        for start_n in range(start, end, BLOCK_N):
            offs_n = start_n + offs_n0
            k, v = _load_kv_block(k_base, v_base, offs_n, offs_d, stride_kt, stride_vt, T, MASKED)
            qk = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] fp32
            if MASKED:
                seen = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
                qk = tl.where(seen, _log2_scores(qk, qk_scale, sm_scale, softcap, SOFTCAP), float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
                p = tl.exp2(qk - m_ref[:, None])
                alpha = tl.exp2(m_i - m_ref)
            elif SOFTCAP:
                qk = _log2_scores(qk, qk_scale, sm_scale, softcap, SOFTCAP)
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                p = tl.exp2(qk - m_new[:, None])
                alpha = tl.exp2(m_i - m_new)
            else:  # the scale is applied after the row max (it is positive): one FMA per score
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                p = tl.exp2(qk * qk_scale - m_new[:, None])
                alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(
        Q,  # [B, Hq, T, D] queries (any strides, last dim contiguous)
        K,  # [B, Hkv, T, D] keys
        V,  # [B, Hkv, T, D] values
        O,  # [B, Hq, T, D] output, written here
        LSE,  # fp32 [B, Hq, T] log2-sum-exp2 of the scaled (and capped) scores (+inf for empty rows)
        RANGES,  # int32 [B, 4, T] per-token attention ranges (read only if HAS_DOCS)
        SINKS,  # fp32 [Hq] each head's sink logit (read only if HAS_SINKS)
        stride_qb, stride_qh, stride_qt,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        stride_ob, stride_oh, stride_ot,
        T, qk_scale, sm_scale,  # sm_scale * log2(e), and the softmax scale itself
        softcap,  # fp32 c of c * tanh(s / c) (read only if SOFTCAP)
        T_BUCKET,  # autotuning key only: next power of two of T, capped
        HQ: tl.constexpr,
        GROUP: tl.constexpr,  # query heads per kv head
        HEAD_DIM: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_DOCS: tl.constexpr,  # RANGES holds the ranges (packed documents or a sliding window)
        SOFTCAP: tl.constexpr,
        HAS_SINKS: tl.constexpr,  # SINKS join the softmax's denominators
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # Last query blocks first: under a causal mask they have the most work.
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = pid_bh // HQ
        off_h = pid_bh % HQ
        off_hkv = off_h // GROUP

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        k_base = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
        v_base = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
        row_in = offs_m < T
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_in[:, None], other=0.0)

        lo, hi, valid = _attn_ranges(RANGES, off_b, offs_m, T, CAUSAL, HAS_DOCS, False)
        start, a, b, end = _attn_schedule(lo, hi, valid, BLOCK_N)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi,
                                        start, a, T, qk_scale, sm_scale, softcap, offs_d, BLOCK_N, True, SOFTCAP)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi,
                                        a, b, T, qk_scale, sm_scale, softcap, offs_d, BLOCK_N, False, SOFTCAP)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi,
                                        b, end, T, qk_scale, sm_scale, softcap, offs_d, BLOCK_N, True, SOFTCAP)

        # Padding rows may have ridden along through unmasked blocks: they still give 0.
        empty = (l_i == 0.0) | (hi <= lo)
        if HAS_SINKS:  # one more term of the sum, exp2(sink - m), whose value vector is 0
            sink = tl.load(SINKS + off_h) * _LOG2E_C
            m_new = tl.maximum(m_i, sink)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.exp2(sink - m_new)
            acc = acc * alpha[:, None]
            m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
        lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
        o_base = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
        tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=row_in[:, None])
        tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=row_in)

    @triton.jit
    def _attn_bwd_preprocess_kernel(
        O,  # [B, Hq, T, D] forward output
        DO,  # [B, Hq, T, D] gradient of the output
        DELTA,  # fp32 [B, Hq, T] rowsum(dO * O), written here
        stride_ob, stride_oh, stride_ot,
        stride_dob, stride_doh, stride_dot,
        T,
        HQ: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = pid_bh // HQ
        off_h = pid_bh % HQ
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_in = (offs_m < T)[:, None]
        o = tl.load(O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
                    + offs_m[:, None] * stride_ot + offs_d[None, :], mask=row_in, other=0.0)
        do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                     + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_in, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)

    @triton.jit
    def _attn_bwd_dkdv_inner(
        dk, dv, k, v,
        q_head0,  # Q of this batch, first query head to visit, row 0
        do_head0,  # dO likewise
        lse_head0,  # LSE likewise
        delta_head0,  # DELTA likewise
        stride_qh, stride_qt, stride_doh, stride_dot,
        qlo, qhi,  # int32 [BLOCK_N]: query range that sees each key
        start, n_blocks, T, qk_scale, sm_scale, softcap,
        offs_d,
        HEADS: tl.constexpr,  # query heads to visit, starting at the *_head0 pointers
        BLOCK_M: tl.constexpr,
        MASKED: tl.constexpr,
        SOFTCAP: tl.constexpr,
    ):
        # One flat loop over (query head of the group, query block): a loop over heads
        # around the block loops keeps far more registers live (measured: spills).
        offs_m0 = tl.arange(0, BLOCK_M)
        for i in range(0, HEADS * n_blocks):
            g = i // n_blocks
            offs_m = start + (i - g * n_blocks) * BLOCK_M + offs_m0
            q_ptrs = q_head0 + g * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
            do_ptrs = do_head0 + g * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :]
            lse_ptrs = lse_head0 + g * T + offs_m
            delta_ptrs = delta_head0 + g * T + offs_m
            if MASKED:
                row_in = offs_m < T
                q = tl.load(q_ptrs, mask=row_in[:, None], other=0.0)
                do = tl.load(do_ptrs, mask=row_in[:, None], other=0.0)
                lse = tl.load(lse_ptrs, mask=row_in, other=float("inf"))
                delta = tl.load(delta_ptrs, mask=row_in, other=0.0)
            else:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
                lse = tl.load(lse_ptrs)
                delta = tl.load(delta_ptrs)
            qkT = tl.dot(k, tl.trans(q))  # [BLOCK_N, BLOCK_M]
            if SOFTCAP:
                sigT = _softcap_sigmoid(qkT, sm_scale, softcap)
                pT = tl.exp2((2.0 * sigT - 1.0) * (softcap * _LOG2E_C) - lse[None, :])
            else:
                pT = tl.exp2(qkT * qk_scale - lse[None, :])
            if MASKED:
                seen = (offs_m[None, :] >= qlo[:, None]) & (offs_m[None, :] < qhi[:, None])
                pT = tl.where(seen, pT, 0.0)
            if SOFTCAP:  # through c * tanh(s / c): ds gets 1 - tanh^2, folded in now so sigT dies here
                pT_ds = pT * (4.0 * sigT * (1.0 - sigT))
            else:
                pT_ds = pT
            dv = tl.dot(pT.to(do.dtype), do, dv)  # [BLOCK_N, HEAD_DIM]
            dpT = tl.dot(v, tl.trans(do))  # [BLOCK_N, BLOCK_M]
            dsT = pT_ds * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(q.dtype), q, dk)  # [BLOCK_N, HEAD_DIM]
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q,  # [B, Hq, T, D] queries
        K,  # [B, Hkv, T, D] keys
        V,  # [B, Hkv, T, D] values
        DO,  # [B, Hq, T, D] gradient of the output
        LSE,  # fp32 [B, Hq, T] from the forward
        DELTA,  # fp32 [B, Hq, T] from the preprocessing kernel
        DK,  # [SPLIT, B, Hkv, T, D] written here, summed over the query heads of the split
        DV,  # [SPLIT, B, Hkv, T, D] written here, likewise
        RANGES,  # int32 [B, 4, T] per-token attention ranges (read only if HAS_DOCS)
        stride_qb, stride_qh, stride_qt,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        stride_dob, stride_doh, stride_dot,
        stride_dks, stride_dkb, stride_dkh, stride_dkt,
        stride_dvs, stride_dvb, stride_dvh, stride_dvt,
        T, qk_scale, sm_scale,
        softcap,  # fp32 c of c * tanh(s / c) (read only if SOFTCAP)
        T_BUCKET,  # autotuning key only
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        GROUP: tl.constexpr,
        SPLIT: tl.constexpr,  # programs sharing one kv head's group (1 unless B * Hkv is small)
        HEAD_DIM: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_DOCS: tl.constexpr,
        SOFTCAP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_bhs = tl.program_id(1)
        off_split = pid_bhs % SPLIT
        off_b = (pid_bhs // SPLIT) // HKV
        off_hkv = (pid_bhs // SPLIT) % HKV

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        key_in = (offs_n < T)[:, None]
        k = tl.load(K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
                    + offs_n[:, None] * stride_kt + offs_d[None, :], mask=key_in, other=0.0)
        v = tl.load(V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
                    + offs_n[:, None] * stride_vt + offs_d[None, :], mask=key_in, other=0.0)

        qlo, qhi, valid = _attn_ranges(RANGES, off_b, offs_n, T, CAUSAL, HAS_DOCS, True)
        start, a, b, end = _attn_schedule(qlo, qhi, valid, BLOCK_M)

        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        HEADS: tl.constexpr = GROUP // SPLIT  # query heads this program visits
        off_h0 = off_hkv * GROUP + off_split * HEADS  # they are off_h0 .. off_h0 + HEADS - 1
        q_head0 = Q + off_b.to(tl.int64) * stride_qb + off_h0.to(tl.int64) * stride_qh
        do_head0 = DO + off_b.to(tl.int64) * stride_dob + off_h0.to(tl.int64) * stride_doh
        row0 = (off_b * HQ + off_h0).to(tl.int64) * T
        n_lead = (a - start) // BLOCK_M
        n_full = (b - a) // BLOCK_M
        n_trail = (end - b) // BLOCK_M
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_head0, do_head0, LSE + row0, DELTA + row0,
                                      stride_qh, stride_qt, stride_doh, stride_dot, qlo, qhi,
                                      start, n_lead, T, qk_scale, sm_scale, softcap, offs_d, HEADS, BLOCK_M, True,
                                      SOFTCAP)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_head0, do_head0, LSE + row0, DELTA + row0,
                                      stride_qh, stride_qt, stride_doh, stride_dot, qlo, qhi,
                                      a, n_full, T, qk_scale, sm_scale, softcap, offs_d, HEADS, BLOCK_M, False,
                                      SOFTCAP)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_head0, do_head0, LSE + row0, DELTA + row0,
                                      stride_qh, stride_qt, stride_doh, stride_dot, qlo, qhi,
                                      b, n_trail, T, qk_scale, sm_scale, softcap, offs_d, HEADS, BLOCK_M, True,
                                      SOFTCAP)

        # Padding keys may have ridden along through unmasked blocks: their gradients are 0.
        dk = tl.where(valid[:, None], dk * sm_scale, 0.0)
        dv = tl.where(valid[:, None], dv, 0.0)
        dk_base = DK + (off_split.to(tl.int64) * stride_dks + off_b.to(tl.int64) * stride_dkb
                        + off_hkv.to(tl.int64) * stride_dkh)
        dv_base = DV + (off_split.to(tl.int64) * stride_dvs + off_b.to(tl.int64) * stride_dvb
                        + off_hkv.to(tl.int64) * stride_dvh)
        tl.store(dk_base + offs_n[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=key_in)
        tl.store(dv_base + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=key_in)

    @triton.jit
    def _attn_bwd_dq_inner(
        dq, q, do, lse, delta,
        k_base,  # K of this (batch, kv head), row 0
        v_base,  # V of this (batch, kv head), row 0
        stride_kt, stride_vt,
        lo, hi,  # int32 [BLOCK_M]: key range of each query row
        start, end, T, qk_scale, sm_scale, softcap,
        offs_d,
        BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr,
        SOFTCAP: tl.constexpr,
    ):
        offs_n0 = tl.arange(0, BLOCK_N)
        for start_n in range(start, end, BLOCK_N):
            offs_n = start_n + offs_n0
            k, v = _load_kv_block(k_base, v_base, offs_n, offs_d, stride_kt, stride_vt, T, MASKED)
            qk = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N]
            if SOFTCAP:
                sig = _softcap_sigmoid(qk, sm_scale, softcap)
                p = tl.exp2((2.0 * sig - 1.0) * (softcap * _LOG2E_C) - lse[:, None])
            else:
                p = tl.exp2(qk * qk_scale - lse[:, None])
            if MASKED:
                seen = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
                p = tl.where(seen, p, 0.0)
            if SOFTCAP:  # through c * tanh(s / c): ds gets 1 - tanh^2, folded in now so sig dies here
                p = p * (4.0 * sig * (1.0 - sig))
            dp = tl.dot(do, tl.trans(v))  # [BLOCK_M, BLOCK_N]
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q,  # [B, Hq, T, D] queries
        K,  # [B, Hkv, T, D] keys
        V,  # [B, Hkv, T, D] values
        DO,  # [B, Hq, T, D] gradient of the output
        LSE,  # fp32 [B, Hq, T] from the forward (+inf on empty rows, so P is 0 there)
        DELTA,  # fp32 [B, Hq, T] from the preprocessing kernel
        DQ,  # [B, Hq, T, D] written here
        RANGES,  # int32 [B, 4, T] per-token attention ranges (read only if HAS_DOCS)
        stride_qb, stride_qh, stride_qt,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        stride_dob, stride_doh, stride_dot,
        stride_dqb, stride_dqh, stride_dqt,
        T, qk_scale, sm_scale,
        softcap,  # fp32 c of c * tanh(s / c) (read only if SOFTCAP)
        T_BUCKET,  # autotuning key only
        HQ: tl.constexpr,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_DOCS: tl.constexpr,
        SOFTCAP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = pid_bh // HQ
        off_h = pid_bh % HQ
        off_hkv = off_h // GROUP

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_in = offs_m < T
        q = tl.load(Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
                    + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_in[:, None], other=0.0)
        do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                     + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_in[:, None], other=0.0)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=row_in, other=float("inf"))
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=row_in, other=0.0)
        k_base = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
        v_base = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh

        lo, hi, valid = _attn_ranges(RANGES, off_b, offs_m, T, CAUSAL, HAS_DOCS, False)
        start, a, b, end = _attn_schedule(lo, hi, valid, BLOCK_N)

        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, lo, hi,
                                start, a, T, qk_scale, sm_scale, softcap, offs_d, BLOCK_N, True, SOFTCAP)
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, lo, hi,
                                a, b, T, qk_scale, sm_scale, softcap, offs_d, BLOCK_N, False, SOFTCAP)
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, lo, hi,
                                b, end, T, qk_scale, sm_scale, softcap, offs_d, BLOCK_N, True, SOFTCAP)
        dq = tl.where(valid[:, None], dq * sm_scale, 0.0)
        tl.store(DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh
                 + offs_m[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=row_in[:, None])

    _jit_interpreted = interpreted(_attn_fwd_kernel)  # the mode @triton.jit chose at this import
else:  # pragma: no cover - depends on the environment
    _jit_interpreted = False


# ---------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per GPU generation, kernel and head
# dim; BLOCK_M counts query rows and BLOCK_N key rows in every kernel. Each one compiles
# without register spills, within the generation's shared memory, and on Hopper with wgmma,
# with Triton 3.6 and 3.9 (tests/kernels/test_compile_report.py, `sftplug doctor --compile`);
# which is fastest the autotuner measures on the first call, and Triton keeps its answer on disk.
# Every head dim has its own lists (the report and the test compile each one). ptxas aims a
# kernel at a register count that lets one more block share the SM (128 per thread at 8 warps,
# 168 at 4) and spills a few bytes where the kernel needs just over it, so a config clean at
# D=64 may spill at D=16 or 32: each list keeps its configs clearly below or above those steps.
# Hopper (227 KB of shared memory) takes the larger tiles and deeper pipelines; at D <= 32
# the configs of 64 stay (114-245 registers there, wgmma).
_HOPPER = {
    "fwd": {
        16: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4)],
        32: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4)],
        64: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4)],
        128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4)],
        256: [(128, 32, 8, 2), (64, 32, 8, 2)],
    },
    "dkdv": {
        16: [(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3)],
        32: [(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3)],
        64: [(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3)],
        128: [(32, 128, 8, 3), (32, 128, 8, 2), (32, 64, 8, 3)],
        # No wgmma tile fits D=256's two fp32 [BLOCK_N, 256] accumulators without spills:
        # these use mma.sync, and auto leaves D=256 on Hopper to flash (plugins/triton_attention.py).
        256: [(32, 32, 8, 2), (16, 32, 4, 2)],
    },
    "dq": {
        16: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
        32: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
        64: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
        128: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3)],
        256: [(128, 32, 8, 2), (128, 32, 8, 3)],
    },
}
# Ampere and Ada (A100 163 KB of shared memory, consumer cards 99 KB, where the autotuner
# skips the one config that needs 100 KB): mma.sync needs more registers, so smaller tiles.
# At D <= 32 the forward's fp32 [BLOCK_M, BLOCK_N] scores dominate its registers: 128 x 128
# over 8 warps lands on the 128 step at D=16 and 128 x 64 over 8 warps at D=32, so these take
# 128 keys over 4 warps (64 x 128) and a 64 x 64 tile for short sequences; the backward
# kernels keep the configs of 64 (80-187 registers there).
_AMPERE = {
    "fwd": {
        16: [(128, 64, 8, 3), (64, 128, 4, 3), (64, 64, 4, 2)],
        32: [(128, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 2)],
        64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 32, 4, 2)],
        128: [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
        256: [(64, 32, 8, 2), (32, 32, 4, 1)],
    },
    "dkdv": {
        16: [(32, 64, 8, 2), (32, 64, 4, 2), (32, 128, 8, 2)],
        32: [(32, 64, 8, 2), (32, 64, 4, 2), (32, 128, 8, 2)],
        64: [(32, 64, 8, 2), (32, 64, 4, 2), (32, 128, 8, 2)],
        128: [(32, 64, 8, 2), (16, 64, 8, 2), (32, 32, 4, 2)],
        256: [(32, 32, 8, 2), (16, 32, 4, 2), (16, 64, 8, 2)],
    },
    "dq": {
        16: [(128, 64, 8, 3), (64, 32, 4, 2), (64, 64, 8, 2)],
        32: [(128, 64, 8, 3), (64, 32, 4, 2), (64, 64, 8, 2)],
        64: [(128, 64, 8, 3), (64, 32, 4, 2), (64, 64, 8, 2)],
        128: [(128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 8, 2)],
        256: [(64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2)],
    },
}
_TUNE_KEY = ["HEAD_DIM", "T_BUCKET", "CAUSAL", "SOFTCAP"]
_TUNED: dict = {}  # kernel kind -> autotuned launcher, built on the first GPU call


def _hopper(device) -> bool:
    """Hopper's configs need sm_90's wgmma and 227 KB of shared memory."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (9, 0)


# Configs that spill registers once scores are soft-capped (tanh and its derivative live in
# the loop): (kind, head dim, hopper) -> configs the soft-capped variant leaves out.
_SOFTCAP_SPILLS = {("dq", 256, False): {(64, 32, 8, 2), (32, 32, 4, 2)}}


def candidate_configs(kind: str, head_dim: int, hopper: bool, softcap: bool = False) -> list[tuple[int, int, int, int]]:
    """The (BLOCK_M, BLOCK_N, warps, stages) the autotuner may choose for one kernel kind."""
    spills = _SOFTCAP_SPILLS.get((kind, head_dim, hopper), set()) if softcap else set()
    return [c for c in (_HOPPER if hopper else _AMPERE)[kind][head_dim] if c not in spills]


def kernel_of(kind: str):
    """The Triton kernel of a kind: "fwd", "dkdv" or "dq"."""
    return {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}[kind]


def _candidates(kind: str, head_dim: int, device, softcap: bool) -> list:
    return candidate_configs(kind, head_dim, _hopper(device), softcap)


def _prune(kind):
    def prune(configs, named_args, **kwargs):
        head_dim = named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM"))
        softcap = bool(named_args.get("SOFTCAP", kwargs.get("SOFTCAP", False)))
        q = named_args["Q"]
        wanted = set(_candidates(kind, head_dim, q.device, softcap))
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
        # Short sequences: drop blocks far longer than the sequence (they only add padding).
        T = named_args["T"]
        short = [c for c in kept if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= max(64, T)] or kept
        # SFTPLUG_TRITON_TUNE=0: the first candidate only, no tuning (tests, quick checks)
        return short[:1] if os.environ.get("SFTPLUG_TRITON_TUNE") == "0" else short

    return prune


def _tuned(kind: str):
    """The autotuned GPU launcher for one kernel kind (built on first use)."""
    if kind not in _TUNED:
        kernel = kernel_of(kind)
        every = sorted({c for table in (_HOPPER, _AMPERE) for per_dim in table[kind].values() for c in per_dim})
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in every]
        tune = dict(configs=configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune(kind)})
        try:  # keep the tuning result on disk for the next run (Triton >= 3.2)
            decorate = triton.autotune(**tune, cache_results=True)
        except TypeError:  # pragma: no cover - older Triton
            decorate = triton.autotune(**tune)
        _TUNED[kind] = decorate(kernel)
    return _TUNED[kind]


def _launch(kind: str, grid_m, grid_bh: int, *args, **kwargs):
    """Launch a kernel: fixed small blocks under the interpreter, autotuned on a GPU."""
    if _jit_interpreted:
        kernel = kernel_of(kind)
        block = _INTERPRET_BLOCK
        kernel[(grid_m(block, block), grid_bh)](*args, **kwargs, BLOCK_M=block, BLOCK_N=block)
    else:
        _tuned(kind)[lambda meta: (grid_m(meta["BLOCK_M"], meta["BLOCK_N"]), grid_bh)](*args, **kwargs,
                                                                                        enable_fp_fusion=True)


# ---------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------


def _doc_ranges(doc_ids: torch.Tensor | None, T: int, causal: bool, window: int = 0, batch: int = 1,
                device=None) -> torch.Tensor:
    """int32 [B, 4, T]: for every token, the key range [lo, hi) a query there sees, and the
    query range that sees a key there. Documents are runs of equal ids (None: one document
    of ``batch`` rows); ids < 0 are padding (empty ranges). A sliding window W (causal)
    cuts a query i's keys to j > i - W and a key j's queries to i < j + W. A handful of
    elementwise ops and scans; no host-device sync."""
    device = doc_ids.device if doc_ids is not None else device
    B = doc_ids.shape[0] if doc_ids is not None else batch
    pos = torch.arange(T, device=device, dtype=torch.int32).expand(B, T)
    if doc_ids is None:
        start, stop = torch.zeros_like(pos), torch.full_like(pos, T)
        pad = torch.zeros(B, T, dtype=torch.bool, device=device)
    else:
        ids = doc_ids
        first = torch.ones(B, T, dtype=torch.bool, device=device)
        first[:, 1:] = ids[:, 1:] != ids[:, :-1]
        last = torch.ones_like(first)
        last[:, :-1] = first[:, 1:]
        start = torch.cummax(torch.where(first, pos, 0), dim=1).values  # first token of the run
        stop = torch.where(last, pos + 1, T).flip(1).cummin(dim=1).values.flip(1)  # one past its last
        pad = ids < 0
    q_lo, q_hi = start, pos + 1 if causal else stop
    k_lo, k_hi = pos if causal else start, stop
    if window:
        q_lo = torch.maximum(q_lo, pos - (window - 1))
        k_hi = torch.minimum(k_hi, pos + window)
    empty_lo = torch.full_like(pos, T)
    empty_hi = torch.zeros_like(pos)
    q_lo = torch.where(pad, empty_lo, q_lo)
    q_hi = torch.where(pad, empty_hi, q_hi)
    k_lo = torch.where(pad, empty_lo, k_lo)
    k_hi = torch.where(pad, empty_hi, k_hi)
    return torch.stack([q_lo, q_hi, k_lo, k_hi], dim=1).to(torch.int32).contiguous()


def _dkdv_split(B: int, HKV: int, group: int, T: int, device) -> int:
    """How many programs share one kv head's query-head group in the dK/dV kernel.

    One program per (key block, kv head) needs no atomics, but with few kv heads and a
    small batch there are too few programs to fill the GPU; then the group is split and
    the fp32 partial sums are added afterwards.
    """
    if _jit_interpreted or group == 1:
        return 1
    programs = triton.cdiv(T, 128) * B * HKV
    target = 2 * sm_count(device)
    split = 1
    while group % (2 * split) == 0 and programs * split < target:
        split *= 2
    return split


def _strides(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


def _t_bucket(T: int) -> int:
    return min(triton.next_power_of_2(max(T, 16)), 16384)


def _attn_forward(q, k, v, causal: bool, scale: float, softcap: float, ranges, sinks=None):
    B, HQ, T, D = q.shape
    HKV = k.shape[1]
    o = torch.empty(B, HQ, T, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
    _launch(
        "fwd", lambda bm, bn: triton.cdiv(T, bm), B * HQ,
        q, k, v, o, lse, ranges if ranges is not None else lse,
        sinks.float().contiguous() if sinks is not None else lse,  # (read only if HAS_SINKS)
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        T, scale * _LOG2E, scale, softcap or 1.0, _t_bucket(T),  # (the cap is read only if SOFTCAP)
        HQ=HQ, GROUP=HQ // HKV, HEAD_DIM=D, CAUSAL=causal, HAS_DOCS=ranges is not None, SOFTCAP=softcap > 0,
        HAS_SINKS=sinks is not None,
    )
    return o, lse


def _attn_backward(do, q, k, v, o, lse, causal: bool, scale: float, softcap: float, ranges):
    B, HQ, T, D = q.shape
    HKV = k.shape[1]
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty_like(lse)
    pre_block = _INTERPRET_BLOCK if _jit_interpreted else 64
    _attn_bwd_preprocess_kernel[(triton.cdiv(T, pre_block), B * HQ)](
        o, do, delta, *_strides(o), *_strides(do), T, HQ=HQ, HEAD_DIM=D, BLOCK_M=pre_block,
        **({} if _jit_interpreted else {"enable_fp_fusion": True}),
    )
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    split = _dkdv_split(B, HKV, HQ // HKV, T, q.device)
    if split == 1:
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)[None]  # [1, B, HKV, T, D]
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)[None]
    else:  # fp32 partial sums, one per split, added up below
        dk = torch.empty(split, *k.shape, device=k.device, dtype=torch.float32)
        dv = torch.empty(split, *v.shape, device=v.device, dtype=torch.float32)
    rng = ranges if ranges is not None else lse
    common = dict(HEAD_DIM=D, CAUSAL=causal, HAS_DOCS=ranges is not None, SOFTCAP=softcap > 0)
    _launch(
        "dkdv", lambda bm, bn: triton.cdiv(T, bn), B * HKV * split,
        q, k, v, do, lse, delta, dk, dv, rng,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *dk.stride()[:4], *dv.stride()[:4],
        T, scale * _LOG2E, scale, softcap or 1.0, _t_bucket(T),
        HQ=HQ, HKV=HKV, GROUP=HQ // HKV, SPLIT=split, **common,
    )
    _launch(
        "dq", lambda bm, bn: triton.cdiv(T, bm), B * HQ,
        q, k, v, do, lse, delta, dq, rng,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        T, scale * _LOG2E, scale, softcap or 1.0, _t_bucket(T),
        HQ=HQ, GROUP=HQ // HKV, **common,
    )
    if split == 1:
        return dq, dk[0], dv[0], delta
    return dq, dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype), delta


def _sinks_grad(sinks, lse, delta):
    """d loss / d sinks [Hq]: -sum over batch and rows of P_sink * rowsum(dO * O), where
    P_sink = exp2(s_h log2(e) - lse) (lse in base 2, +inf on empty rows: there P_sink is 0)."""
    p_sink = torch.exp2(sinks.float()[None, :, None] * _LOG2E - lse)  # [B, Hq, T]
    return -(p_sink * delta).sum((0, 2)).to(sinks.dtype)


class TritonAttention(torch.autograd.Function):
    """softmax(cap(scale * Q K^T) + mask) V with the fused Triton kernels, forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, softcap: float, ranges, sinks):
        with on_device(q):
            o, lse = _attn_forward(q, k, v, causal, scale, softcap, ranges, sinks)
        ctx.save_for_backward(q, k, v, o, lse, ranges, sinks)
        ctx.causal = causal
        ctx.scale = scale
        ctx.softcap = softcap
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, ranges, sinks = ctx.saved_tensors
        with on_device(q):
            dq, dk, dv, delta = _attn_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.softcap, ranges)
        dsinks = _sinks_grad(sinks, lse, delta) if sinks is not None and ctx.needs_input_grad[7] else None
        return dq, dk, dv, None, None, None, None, dsinks


def _check_inputs(q, k, v, doc_ids, scale, causal, window, softcap, sinks):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, HQ, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (T, D):
        raise ValueError(f"k and v must be [B, Hkv, T, D] = [{B}, Hkv, {T}, {D}]; "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] == 0 or HQ % k.shape[1] != 0:
        raise ValueError(f"query heads ({HQ}) must be a multiple of kv heads ({k.shape[1]})")
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported (supported: {', '.join(map(str, HEAD_DIMS))})")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype of fp16, bf16, fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if doc_ids is not None:
        if doc_ids.shape != (B, T) or doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
            raise ValueError(f"doc_ids must be an integer tensor of shape [{B}, {T}]; "
                             f"got {doc_ids.dtype} {tuple(doc_ids.shape)}")
    if not scale > 0:
        raise ValueError(f"scale must be positive; got {scale}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an integer >= 0 (0: none); got {window!r}")
    if window and not causal:
        raise ValueError("a sliding window needs causal=True (non-causal windows are not supported)")
    if not (softcap >= 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be finite and >= 0 (0: none); got {softcap}")
    if sinks is not None and (sinks.shape != (HQ,) or not sinks.is_floating_point() or sinks.device != q.device):
        raise ValueError(f"sinks must be a float tensor of shape [{HQ}] (one logit per query head) on q's device; "
                         f"got {sinks.dtype} {tuple(sinks.shape)} on {sinks.device}")


def triton_attention(q, k, v, *, causal=True, scale=None, doc_ids=None, window=0, softcap=0.0, sinks=None):
    """Fused attention: q [B, Hq, T, D], k and v [B, Hkv, T, D] -> [B, Hq, T, D] in q's dtype.

    ``causal``: a query attends only to keys at or before it. ``scale``: defaults to
    1/sqrt(D). ``doc_ids``: optional [B, T] integer tensor of packed documents, ids
    non-decreasing along T (the kernel treats each run of equal ids as one document): a
    token attends only within its own document; a negative id marks padding, whose
    output and gradients are 0 and which no token attends. ``window`` W > 0 (causal
    only): a query at i sees keys i - W < j <= i (within its document); key blocks behind
    the window are skipped. ``softcap`` c > 0: the scaled scores s become c * tanh(s / c)
    before the softmax. ``sinks`` [Hq]: head h's logit s_h joins each of its rows' softmax
    denominators only (gpt-oss). GQA (Hq a multiple of Hkv) is handled in the kernel; K/V are
    never repeated. Differentiable in q, k, v and sinks.

    Runs fp16 / bf16 on CUDA GPUs of compute capability 8.0+, and fp32 / fp16 (bf16 via
    fp32) under TRITON_INTERPRET=1 on the CPU; see :func:`triton_attention_available`.
    """
    ok, why = triton_attention_available()
    if not ok:
        raise RuntimeError(f"triton_attention cannot run here: {why}")
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    softcap = float(softcap or 0.0)
    _check_inputs(q, k, v, doc_ids, scale, causal, window, softcap, sinks)
    if q.numel() == 0:
        kept = q.sum() + k.sum() + v.sum() + (0 if sinks is None else sinks.sum())
        return q.new_zeros(q.shape) + 0 * kept  # keeps the graph
    check_cuda("triton_attention", _jit_interpreted, q)
    if not _jit_interpreted and q.dtype == torch.float32:
        raise ValueError("triton_attention runs fp16 and bf16 on the GPU (fp32 only under TRITON_INTERPRET=1)")
    out_dtype = q.dtype
    if _jit_interpreted and out_dtype == torch.bfloat16:
        # The interpreter's bf16 tl.dot is wrong: compute in fp32 there (autograd casts back).
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    T = q.shape[2]
    window = window if window < T else 0  # a window as long as the row cuts nothing
    if doc_ids is not None:
        ranges = _doc_ranges(doc_ids.to(q.device), T, causal, window)
    elif window:
        ranges = _doc_ranges(None, T, causal, window, batch=q.shape[0], device=q.device)
    else:
        ranges = None  # computed in the kernel
    out = TritonAttention.apply(q, k, v, bool(causal), scale, softcap, ranges, sinks)
    return out.to(out_dtype)
