"""The gated delta rule (Gated DeltaNet's linear attention: Qwen3.5, Qwen3-Next) as chunked Triton kernels.

Per (row, v head, document) the state S [Dk, Dv] starts at zero at the document's first token and
each token t does, exactly as transformers' ``torch_recurrent_gated_delta_rule``::

    S = exp(g_t) S;  S += k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T (q_t Dk^-0.5)

Chunked form (chunks of BT positions; gc the cumulative decay within the chunk, Gamma_ij =
exp(gc_i - gc_j) for j <= i of one document, S0 the state entering the chunk):

- A = strictly lower (diag(beta) K K^T o Gamma), T = (I + A)^-1 (the UT / WY transform: T is
  the product (I + N)(I + N^2)(I + N^4)... of N = -A, log2(BT) matrix squarings, as A is nilpotent);
- W = T diag(beta exp(gc)) K, U = T diag(beta) V; the new values Vn = U - W S0;
- O = diag(exp(gc)) Q S0 + (Q K^T o Gamma) Vn; S1 = exp(gc_last) S0 + K^T diag(exp(gc_last - gc)) Vn.

Packed rows need no host sync and no varlen layout: chunks stay at fixed positions and each
kernel masks by the chunk's ``doc_ids``. Pairs of positions in different documents never meet
(A, Gamma); only tokens of the document that was running before the chunk read S0 (the
``reads`` mask in W and in O's state term); only tokens of the chunk's last document write S1,
and S0 carries into S1 only if that document began before the chunk.

Kernels: ``_prepare`` (per chunk: gc, T, W, U), ``_scan`` (per row, head and Dv block: the
state across chunks in fp32, O; in backward it saves each chunk's S0 and Vn), ``_state_grad``
(the same scan backwards: dS per chunk and dVn), ``_grads_through_t`` and ``_grads`` (per chunk:
dv, dbeta and dk's and dg's parts through T, W and U; then dq and the rest of dk and dg).
Products of the inputs (Q K^T, K K^T) run in the inputs' dtype; products with derived fp32 values
(T, W, U, S) in fp32 (IEEE for fp32 inputs, TF32 on a GPU for fp16 / bf16), accumulated in fp32.
q and k heads serve Hv / Hk consecutive v heads; their gradients are summed over the group.

Public API: :func:`gated_delta_rule`, :class:`GatedDeltaRule`, :func:`compile_specs`.
"""

from __future__ import annotations

import torch

from sftplug.kernels.runtime import IMPORT_ERROR, check_runnable, interpreted, on_device, tl, triton

__all__ = ["GatedDeltaRule", "compile_specs", "gated_delta_rule"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (16, 32, 64, 128)  # Dk and Dv: powers of two tl.dot takes (16 and 32 for tests)
# (chunk BT, Dv block BV, warps, stages) by target and Dk
_CONFIGS = {
    "hopper": {64: (32, 64, 8, 1), 128: (32, 16, 8, 1)},
    "ampere": {64: (32, 64, 8, 1), 128: (32, 16, 8, 1)},
    # the interpreter: small chunks, so short test rows span several of them
    "interpreter": {d: (16, 16, 1, 1) for d in HEAD_DIMS},
}


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _chunk_masks(DOCS, row, t0, T, HAS_DOCS: tl.constexpr, BT: tl.constexpr):
        """The chunk [t0, t0 + BT) of a row: (valid [BT], same document [BT, BT], reads S0 [BT],
        writes S1 [BT], S0 carries into S1)."""
        pos = t0 + tl.arange(0, BT)
        valid = pos < T
        has_prev = t0 > 0
        if HAS_DOCS:
            base = DOCS + row.to(tl.int64) * T
            docs = tl.load(base + pos, mask=valid, other=0)
            prev = tl.load(base + t0 - 1, mask=has_prev, other=0)  # the document running into the chunk
            last = tl.load(base + tl.minimum(t0 + BT, T) - 1)
        else:
            docs = tl.zeros([BT], dtype=tl.int32)
            prev = 0
            last = 0
        same = (docs[:, None] == docs[None, :]) & valid[:, None] & valid[None, :]
        reads = (docs == prev) & valid & has_prev
        writes = (docs == last) & valid
        carries = (last == prev) & has_prev
        return valid, same, reads, writes, carries

    @triton.jit
    def _decay(gc, same, BT: tl.constexpr, STRICT: tl.constexpr):
        """Gamma [BT, BT]: exp(gc_i - gc_j) for j <= i (j < i if STRICT) of one document, else 0."""
        i = tl.arange(0, BT)
        if STRICT:
            keep = same & (i[:, None] > i[None, :])
        else:
            keep = same & (i[:, None] >= i[None, :])
        return tl.where(keep, tl.exp(tl.where(keep, gc[:, None] - gc[None, :], 0.0)), 0.0)

    @triton.jit
    def _rows(base, pos, valid, row_stride, cols, n_cols, other=0.0):
        """Load [len(pos), len(cols)] from ``base + pos * row_stride + cols`` (rows past T as ``other``)."""
        ptrs = base + pos.to(tl.int64)[:, None] * row_stride + cols[None, :]
        return tl.load(ptrs, mask=valid[:, None] & (cols < n_cols)[None, :], other=other)

    @triton.jit
    def _put_rows(base, pos, valid, row_stride, cols, n_cols, value):
        ptrs = base + pos.to(tl.int64)[:, None] * row_stride + cols[None, :]
        tl.store(ptrs, value.to(base.dtype.element_ty), mask=valid[:, None] & (cols < n_cols)[None, :])

    @triton.jit
    def _prepare_kernel(
        K, V, G, BETA, DOCS,  # inputs: k [B, T, HK, DK], v [B, T, HV, DV], g and beta fp32 [B, T, HV]
        GC, W, U, TINV,  # written: gc [B*HV, T], W [B*HV, T, DK], U [B*HV, T, DV] fp32; T [B*HV, T, BT]
        T, HK, HV,
        HAS_DOCS: tl.constexpr, STORE_T: tl.constexpr, PRECISION: tl.constexpr,
        DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, LOG2_BT: tl.constexpr,
    ):
        t0, bh = tl.program_id(0) * BT, tl.program_id(1)
        b, h = bh // HV, bh % HV
        hk = h // (HV // HK)
        pos = t0 + tl.arange(0, BT)
        valid, same, reads, _, _ = _chunk_masks(DOCS, b, t0, T, HAS_DOCS, BT)
        dk, dv, i = tl.arange(0, DK), tl.arange(0, DV), tl.arange(0, BT)
        token = b.to(tl.int64) * T + pos  # [BT] rows of the [B*T, ...] inputs
        k = _rows(K + hk * DK, token, valid, HK * DK, dk, DK)
        v = _rows(V + h * DV, token, valid, HV * DV, dv, DV).to(tl.float32)
        beta = tl.load(BETA + token * HV + h, mask=valid, other=0.0)
        gc = tl.cumsum(tl.load(G + token * HV + h, mask=valid, other=0.0), 0)
        tl.store(GC + bh.to(tl.int64) * T + pos, gc, mask=valid)

        kk = tl.dot(k, tl.trans(k), input_precision=PRECISION)
        neg_a = -beta[:, None] * kk * _decay(gc, same, BT, True)  # N = -A, strictly lower
        eye = (i[:, None] == i[None, :]).to(tl.float32)
        tinv = eye + neg_a  # (I + N)(I + N^2)(I + N^4)...: N^BT = 0
        power = neg_a
        for _ in tl.static_range(LOG2_BT - 1):
            power = tl.dot(power, power, input_precision=PRECISION)
            tinv += tl.dot(tinv, power, input_precision=PRECISION)
        kb = (beta * tl.where(reads, tl.exp(gc), 0.0))[:, None] * k.to(tl.float32)
        w = tl.dot(tinv, kb, input_precision=PRECISION)
        u = tl.dot(tinv, beta[:, None] * v, input_precision=PRECISION)
        head_rows = bh.to(tl.int64) * T + pos
        _put_rows(W, head_rows, valid, DK, dk, DK, w)
        _put_rows(U, head_rows, valid, DV, dv, DV, u)
        if STORE_T:
            _put_rows(TINV, head_rows, valid, BT, i, BT, tinv)

    @triton.jit
    def _scan_kernel(
        Q, K, DOCS, GC, W, U,  # q, k as _prepare's k; GC, W, U from _prepare
        O,  # [B, T, HV, DV] written (WRITE_OUT)
        H, VN,  # written (STORE_STATES): S0 of each chunk [B*HV, NT, DK, DV], Vn [B*HV, T, DV] fp32
        T, HK, HV, scale,
        HAS_DOCS: tl.constexpr, WRITE_OUT: tl.constexpr, STORE_STATES: tl.constexpr, PRECISION: tl.constexpr,
        DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    ):
        v0, bh = tl.program_id(0) * BV, tl.program_id(1)
        b, h = bh // HV, bh % HV
        hk = h // (HV // HK)
        dk, cols = tl.arange(0, DK), v0 + tl.arange(0, BV)
        n_chunks = tl.cdiv(T, BT)
        state = tl.zeros((DK, BV), dtype=tl.float32)
        for n in range(0, n_chunks):
            t0 = n * BT
            pos = t0 + tl.arange(0, BT)
            valid, same, reads, writes, carries = _chunk_masks(DOCS, b, t0, T, HAS_DOCS, BT)
            token = b.to(tl.int64) * T + pos
            head_rows = bh.to(tl.int64) * T + pos
            k = _rows(K + hk * DK, token, valid, HK * DK, dk, DK)
            gc = tl.load(GC + head_rows, mask=valid, other=0.0)
            gc_last = tl.load(GC + bh.to(tl.int64) * T + tl.minimum(t0 + BT, T) - 1)
            w = _rows(W, head_rows, valid, DK, dk, DK)
            vn = _rows(U, head_rows, valid, DV, cols, DV) - tl.dot(w, state, input_precision=PRECISION)
            if WRITE_OUT:
                q = _rows(Q + hk * DK, token, valid, HK * DK, dk, DK)
                p = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale * _decay(gc, same, BT, False)
                qd = (scale * tl.where(reads, tl.exp(gc), 0.0))[:, None] * q.to(tl.float32)
                o = tl.dot(qd, state, input_precision=PRECISION) + tl.dot(p, vn, input_precision=PRECISION)
                _put_rows(O + h * DV, token, valid, HV * DV, cols, DV, o)
            if STORE_STATES:
                chunk_state = H + ((bh.to(tl.int64) * n_chunks + n) * DK + dk[:, None]) * DV + cols[None, :]
                tl.store(chunk_state, state, mask=(cols < DV)[None, :])
                _put_rows(VN, head_rows, valid, DV, cols, DV, vn)
            kd = tl.where(writes, tl.exp(gc_last - gc), 0.0)[:, None] * k.to(tl.float32)
            state = tl.where(carries, tl.exp(gc_last), 0.0) * state
            state += tl.dot(tl.trans(kd), vn, input_precision=PRECISION)

    @triton.jit
    def _state_grad_kernel(
        Q, K, DOCS, GC, W, DO,  # DO: dO [B, T, HV, DV]
        DH, DVN,  # written: dS1 of each chunk [B*HV, NT, DK, DV], dVn [B*HV, T, DV] fp32
        T, HK, HV, scale,
        HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
        DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    ):
        v0, bh = tl.program_id(0) * BV, tl.program_id(1)
        b, h = bh // HV, bh % HV
        hk = h // (HV // HK)
        dk, cols = tl.arange(0, DK), v0 + tl.arange(0, BV)
        n_chunks = tl.cdiv(T, BT)
        d_state = tl.zeros((DK, BV), dtype=tl.float32)  # the gradient of the state leaving chunk n
        for back in range(0, n_chunks):
            n = n_chunks - 1 - back
            t0 = n * BT
            pos = t0 + tl.arange(0, BT)
            valid, same, reads, writes, carries = _chunk_masks(DOCS, b, t0, T, HAS_DOCS, BT)
            token = b.to(tl.int64) * T + pos
            head_rows = bh.to(tl.int64) * T + pos
            q = _rows(Q + hk * DK, token, valid, HK * DK, dk, DK)
            k = _rows(K + hk * DK, token, valid, HK * DK, dk, DK)
            gc = tl.load(GC + head_rows, mask=valid, other=0.0)
            gc_last = tl.load(GC + bh.to(tl.int64) * T + tl.minimum(t0 + BT, T) - 1)
            d_o = _rows(DO + h * DV, token, valid, HV * DV, cols, DV).to(tl.float32)
            p = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale * _decay(gc, same, BT, False)
            kd = tl.where(writes, tl.exp(gc_last - gc), 0.0)[:, None] * k.to(tl.float32)
            d_vn = tl.dot(tl.trans(p), d_o, input_precision=PRECISION)
            d_vn += tl.dot(kd, d_state, input_precision=PRECISION)
            _put_rows(DVN, head_rows, valid, DV, cols, DV, d_vn)
            chunk_state = DH + ((bh.to(tl.int64) * n_chunks + n) * DK + dk[:, None]) * DV + cols[None, :]
            tl.store(chunk_state, d_state, mask=(cols < DV)[None, :])
            qd = (scale * tl.where(reads, tl.exp(gc), 0.0))[:, None] * q.to(tl.float32)
            w = _rows(W, head_rows, valid, DK, dk, DK)
            d_state = tl.where(carries, tl.exp(gc_last), 0.0) * d_state
            d_state += tl.dot(tl.trans(qd), d_o, input_precision=PRECISION)
            d_state -= tl.dot(tl.trans(w), d_vn, input_precision=PRECISION)

    @triton.jit
    def _chunk_setup(DOCS, GC, bh, HK, HV, T, HAS_DOCS: tl.constexpr, BT: tl.constexpr):
        """What both gradient kernels know of their chunk: (chunk, row, v head, q/k head, positions,
        token rows, head rows, masks..., gc, gc_last)."""
        n, t0 = tl.program_id(0), tl.program_id(0) * BT
        b, h = bh // HV, bh % HV
        pos = t0 + tl.arange(0, BT)
        valid, same, reads, writes, carries = _chunk_masks(DOCS, b, t0, T, HAS_DOCS, BT)
        head_rows = bh.to(tl.int64) * T + pos
        gc = tl.load(GC + head_rows, mask=valid, other=0.0)
        gc_last = tl.load(GC + bh.to(tl.int64) * T + tl.minimum(t0 + BT, T) - 1)
        return (n, h, h // (HV // HK), pos, b.to(tl.int64) * T + pos, head_rows, valid, same, reads, writes,
                carries, gc, gc_last)

    @triton.jit
    def _grads_through_t_kernel(
        K, V, BETA, DOCS, GC, TINV, H, DVN,  # as the kernels above wrote them
        DK_, DV_, DBETA, DGC,  # written: dk's part [B, T, HV, DK], dv, dbeta, dgc's part fp32 [B, T, HV]
        T, HK, HV,
        HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
        DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
    ):
        """The gradients through U = T diag(beta) V and W = T diag(beta exp(gc)) K (T = (I + A)^-1).
        Dk is taken in blocks of BK (few [BT, Dk] tiles live at once)."""
        bh = tl.program_id(1)
        n, h, hk, pos, token, head_rows, valid, same, reads, _, _, gc, _ = _chunk_setup(
            DOCS, GC, bh, HK, HV, T, HAS_DOCS, BT)
        i = tl.arange(0, BT)
        states = H + (bh.to(tl.int64) * tl.cdiv(T, BT) + n) * DK * DV  # this chunk's S0 [DK, DV]
        beta = tl.load(BETA + token * HV + h, mask=valid, other=0.0)
        tinv = _rows(TINV, head_rows, valid, BT, i, BT)
        read_decay = tl.where(reads, tl.exp(gc), 0.0)
        d_t = tl.zeros((BT, BT), dtype=tl.float32)
        d_beta = tl.zeros((BT,), dtype=tl.float32)
        d_gc = tl.zeros((BT,), dtype=tl.float32)
        for v0 in range(0, DV, BV):  # U = T Vb: dU = dVn
            cols = v0 + tl.arange(0, BV)
            d_vn = _rows(DVN, head_rows, valid, DV, cols, DV)
            v = _rows(V + h * DV, token, valid, HV * DV, cols, DV).to(tl.float32)
            d_vb = tl.dot(tl.trans(tinv), d_vn, input_precision=PRECISION)
            _put_rows(DV_ + h * DV, token, valid, HV * DV, cols, DV, beta[:, None] * d_vb)
            d_beta += tl.sum(d_vb * v, 1)
            d_t += tl.dot(d_vn, tl.trans(beta[:, None] * v), input_precision=PRECISION)
        for k0 in range(0, DK, BK):  # W = T Kb: dW = -dVn S0^T (Vn = U - W S0)
            kcols = k0 + tl.arange(0, BK)
            d_w = tl.zeros((BT, BK), dtype=tl.float32)
            for v0 in range(0, DV, BV):
                cols = v0 + tl.arange(0, BV)
                s0 = tl.load(states + kcols[:, None] * DV + cols[None, :], mask=(cols < DV)[None, :], other=0.0)
                d_w -= tl.dot(_rows(DVN, head_rows, valid, DV, cols, DV), tl.trans(s0), input_precision=PRECISION)
            k = _rows(K + hk * DK, token, valid, HK * DK, kcols, DK).to(tl.float32)
            d_t += tl.dot(d_w, tl.trans((beta * read_decay)[:, None] * k), input_precision=PRECISION)
            d_kb = tl.dot(tl.trans(tinv), d_w, input_precision=PRECISION)
            d_kb_k = tl.sum(d_kb * k, 1)
            d_beta += read_decay * d_kb_k
            d_gc += beta * read_decay * d_kb_k  # sum(dKb o Kb)
            _put_rows(DK_ + h * DK, token, valid, HV * DK, kcols, DK, (beta * read_decay)[:, None] * d_kb)
        # dA = -T^T dT T^T on A's strictly lower, same-document part; A = diag(beta) KK, KK = (K K^T) o Gamma
        kk = tl.zeros((BT, BT), dtype=tl.float32)
        for k0 in range(0, DK, BK):
            k = _rows(K + hk * DK, token, valid, HK * DK, k0 + tl.arange(0, BK), DK)
            kk += tl.dot(k, tl.trans(k), input_precision=PRECISION)
        strict_decay = _decay(gc, same, BT, True)
        kk *= strict_decay
        d_a = -tl.dot(tl.dot(tl.trans(tinv), d_t, input_precision=PRECISION), tl.trans(tinv),
                      input_precision=PRECISION)
        d_a = tl.where(same & (i[:, None] > i[None, :]), d_a, 0.0)
        d_beta += tl.sum(d_a * kk, 1)
        d_kk = d_a * beta[:, None]
        by_pair = d_kk * kk
        d_gc += tl.sum(by_pair, 1) - tl.sum(by_pair, 0)
        d_kkk = d_kk * strict_decay
        tl.debug_barrier()  # dk's part through Kb, stored above, is read back below by other threads
        for k0 in range(0, DK, BK):
            kcols = k0 + tl.arange(0, BK)
            k = _rows(K + hk * DK, token, valid, HK * DK, kcols, DK).to(tl.float32)
            d_k = _rows(DK_ + h * DK, token, valid, HV * DK, kcols, DK)
            d_k += tl.dot(d_kkk, k, input_precision=PRECISION) + tl.dot(tl.trans(d_kkk), k, input_precision=PRECISION)
            _put_rows(DK_ + h * DK, token, valid, HV * DK, kcols, DK, d_k)
        tl.store(DBETA + token * HV + h, d_beta, mask=valid)
        tl.store(DGC + token * HV + h, d_gc, mask=valid)

    @triton.jit
    def _grads_kernel(
        Q, K, DOCS, GC, H, VN, DH, DO,  # as the kernels above wrote them
        DQ, DK_, DG,  # written: dq fp32 [B, T, HV, DK] (per v head); dk and dg: _grads_through_t's parts
        # completed
        T, HK, HV, scale,
        HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
        DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    ):
        """The gradients through O = diag(exp(gc)) Q S0 + (Q K^T o Gamma) Vn and S1's K^T diag(...) Vn,
        added to _grads_through_t's; then dg from dgc."""
        bh = tl.program_id(1)
        n, h, hk, pos, token, head_rows, valid, same, reads, writes, carries, gc, gc_last = _chunk_setup(
            DOCS, GC, bh, HK, HV, T, HAS_DOCS, BT)
        t0, dk = n * BT, tl.arange(0, DK)
        n_chunks = tl.cdiv(T, BT)
        d_read = tl.zeros((BT, DK), dtype=tl.float32)  # d(qd) where qd = read_decay * qs
        d_p = tl.zeros((BT, BT), dtype=tl.float32)
        d_kd = tl.zeros((BT, DK), dtype=tl.float32)  # d(kd) where kd = write_decay * k
        d_carry = 0.0  # sum(dS1 o S0): the gradient of S0's carried decay
        for v0 in range(0, DV, BV):
            cols = v0 + tl.arange(0, BV)
            chunk_state = ((bh.to(tl.int64) * n_chunks + n) * DK + dk[:, None]) * DV + cols[None, :]
            s0 = tl.load(H + chunk_state, mask=(cols < DV)[None, :], other=0.0)
            d_s1 = tl.load(DH + chunk_state, mask=(cols < DV)[None, :], other=0.0)
            d_o = _rows(DO + h * DV, token, valid, HV * DV, cols, DV).to(tl.float32)
            vn = _rows(VN, head_rows, valid, DV, cols, DV)
            d_read += tl.dot(d_o, tl.trans(s0), input_precision=PRECISION)
            d_p += tl.dot(d_o, tl.trans(vn), input_precision=PRECISION)
            d_kd += tl.dot(vn, tl.trans(d_s1), input_precision=PRECISION)
            d_carry += tl.sum(tl.sum(d_s1 * s0, 1), 0)
        q = _rows(Q + hk * DK, token, valid, HK * DK, dk, DK)
        k = _rows(K + hk * DK, token, valid, HK * DK, dk, DK)
        k32, qs = k.to(tl.float32), q.to(tl.float32) * scale
        decay = _decay(gc, same, BT, False)
        p = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale * decay
        read_decay = tl.where(reads, tl.exp(gc), 0.0)
        write_decay = tl.where(writes, tl.exp(gc_last - gc), 0.0)
        d_pk = d_p * decay
        d_qs = tl.dot(d_pk, k32, input_precision=PRECISION) + read_decay[:, None] * d_read
        d_k = _rows(DK_ + h * DK, token, valid, HV * DK, dk, DK)
        d_k += tl.dot(tl.trans(d_pk), qs, input_precision=PRECISION) + write_decay[:, None] * d_kd
        # the cumulative decay gc: every exp(gc_i - gc_j), exp(gc_i) and exp(gc_last - gc_j) it enters
        by_pair = d_p * p
        d_gc = tl.load(DG + token * HV + h, mask=valid, other=0.0)
        d_gc += tl.sum(by_pair, 1) - tl.sum(by_pair, 0) + read_decay * tl.sum(d_read * qs, 1)
        by_write = write_decay * tl.sum(d_kd * k32, 1)
        d_gc -= by_write
        d_last = tl.sum(by_write, 0) + tl.where(carries, tl.exp(gc_last), 0.0) * d_carry
        d_gc += tl.where(pos == tl.minimum(t0 + BT, T) - 1, d_last, 0.0)
        d_g = tl.cumsum(d_gc, 0, reverse=True)  # gc_i sums g over the chunk's positions <= i
        _put_rows(DQ + h * DK, token, valid, HV * DK, dk, DK, d_qs * scale)
        _put_rows(DK_ + h * DK, token, valid, HV * DK, dk, DK, d_k)
        tl.store(DG + token * HV + h, d_g, mask=valid)

    _jit_interpreted = interpreted(_prepare_kernel)  # the mode @triton.jit chose at this import
else:  # pragma: no cover - depends on the environment
    _jit_interpreted = False


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------


def _config(device: torch.device, head_dim_k: int, head_dim_v: int) -> tuple[int, int, int, int]:
    """(chunk BT, Dv block BV, warps, stages) on ``device``: small head dims take 64's."""
    if device.type != "cuda":
        target = "interpreter"
    else:
        target = "hopper" if torch.cuda.get_device_capability(device) >= (9, 0) else "ampere"
    configs = _CONFIGS[target]
    chunk, block_v, warps, stages = configs[head_dim_k] if head_dim_k in configs else configs[64]
    return chunk, min(block_v, head_dim_v), warps, stages


def _dk_block(head_dim_k: int) -> int:
    """_grads_through_t's block of Dk: 128 in blocks of 32 (whole, or in 64s, it spills), 64 whole."""
    return head_dim_k if head_dim_k <= 64 else 32


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 values of half inputs' products: TF32


class _Layout:
    """Sizes and launch settings of one call."""

    def __init__(self, q, v, doc_ids):
        self.batch, self.length, self.heads_k, self.dim_k = q.shape
        self.heads_v, self.dim_v = v.shape[2], v.shape[3]
        self.chunk, self.block_v, self.warps, self.stages = _config(q.device, self.dim_k, self.dim_v)
        self.chunks = triton.cdiv(self.length, self.chunk)
        self.rows = self.batch * self.heads_v  # (row, v head) pairs
        self.scale = self.dim_k ** -0.5
        self.has_docs = doc_ids is not None
        self.constexprs = dict(HAS_DOCS=self.has_docs, PRECISION=_precision(q.dtype), DK=self.dim_k,
                               DV=self.dim_v, BT=self.chunk, num_warps=self.warps, num_stages=self.stages)

    def fp32(self, *shape, device):
        return torch.empty(*shape, dtype=torch.float32, device=device)


def _forward(q, k, v, g, beta, docs, lay: _Layout, for_backward: bool):
    """The output (forward), or what backward needs: (gc, W, T^-1, chunk states S0, Vn)."""
    device, T = q.device, lay.length
    gc = lay.fp32(lay.rows, T, device=device)
    w = lay.fp32(lay.rows, T, lay.dim_k, device=device)
    u = lay.fp32(lay.rows, T, lay.dim_v, device=device)
    tinv = lay.fp32(lay.rows, T, lay.chunk, device=device) if for_backward else gc  # gc: never written
    docs = docs if docs is not None else gc  # never read without documents
    _prepare_kernel[(lay.chunks, lay.rows)](
        k, v, g, beta, docs, gc, w, u, tinv, T, lay.heads_k, lay.heads_v, STORE_T=for_backward,
        LOG2_BT=lay.chunk.bit_length() - 1, **lay.constexprs)
    out = gc if for_backward else torch.empty_like(v)
    states = lay.fp32(lay.rows, lay.chunks, lay.dim_k, lay.dim_v, device=device) if for_backward else gc
    new_values = lay.fp32(lay.rows, T, lay.dim_v, device=device) if for_backward else gc
    _scan_kernel[(triton.cdiv(lay.dim_v, lay.block_v), lay.rows)](
        q, k, docs, gc, w, u, out, states, new_values, T, lay.heads_k, lay.heads_v, lay.scale,
        WRITE_OUT=not for_backward, STORE_STATES=for_backward, BV=lay.block_v, **lay.constexprs)
    return (gc, w, tinv, states, new_values) if for_backward else out


def _backward(q, k, v, g, beta, docs, d_out, lay: _Layout):
    """(dq, dk, dv, dg, dbeta): dq and dk summed over each q/k head's group of v heads."""
    device, T = q.device, lay.length
    gc, w, tinv, states, new_values = _forward(q, k, v, g, beta, docs, lay, for_backward=True)
    docs = docs if docs is not None else gc
    d_states = torch.empty_like(states)
    d_new_values = torch.empty_like(new_values)
    _state_grad_kernel[(triton.cdiv(lay.dim_v, lay.block_v), lay.rows)](
        q, k, docs, gc, w, d_out, d_states, d_new_values, T, lay.heads_k, lay.heads_v, lay.scale,
        BV=lay.block_v, **lay.constexprs)
    dq = lay.fp32(lay.batch, T, lay.heads_v, lay.dim_k, device=device)  # per v head, summed below
    dk = torch.empty_like(dq)
    dv = torch.empty_like(v)
    dbeta = lay.fp32(lay.batch, T, lay.heads_v, device=device)
    dg = torch.empty_like(dbeta)
    _grads_through_t_kernel[(lay.chunks, lay.rows)](
        k, v, beta, docs, gc, tinv, states, d_new_values, dk, dv, dbeta, dg, T, lay.heads_k, lay.heads_v,
        BV=lay.block_v, BK=_dk_block(lay.dim_k), **lay.constexprs)
    _grads_kernel[(lay.chunks, lay.rows)](
        q, k, docs, gc, states, new_values, d_states, d_out, dq, dk, dg, T, lay.heads_k, lay.heads_v, lay.scale,
        BV=lay.block_v, **lay.constexprs)
    group = lay.heads_v // lay.heads_k
    dq, dk = (x.view(lay.batch, T, lay.heads_k, group, lay.dim_k).sum(3) for x in (dq, dk))
    return dq, dk, dv, dg, dbeta


class GatedDeltaRule(torch.autograd.Function):
    """The gated delta rule with the Triton kernels (inputs as :func:`gated_delta_rule` takes them)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, doc_ids):
        q, k, v = (x.contiguous() for x in (q, k, v))
        g32, beta32 = (x.to(torch.float32).contiguous() for x in (g, beta))
        docs = doc_ids.to(torch.int32).contiguous() if doc_ids is not None else None
        lay = _Layout(q, v, docs)
        with on_device(q):
            out = _forward(q, k, v, g32, beta32, docs, lay, for_backward=False) if lay.length else torch.empty_like(v)
        ctx.save_for_backward(q, k, v, g32, beta32, docs)
        ctx.lay, ctx.dtypes = lay, (g.dtype, beta.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        q, k, v, g32, beta32, docs = ctx.saved_tensors
        if not ctx.lay.length:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None, None
        with on_device(q):
            dq, dk, dv, dg, dbeta = _backward(q, k, v, g32, beta32, docs, d_out.to(v.dtype).contiguous(), ctx.lay)
        g_dtype, beta_dtype = ctx.dtypes
        return dq.to(q.dtype), dk.to(k.dtype), dv, dg.to(g_dtype), dbeta.to(beta_dtype), None


def gated_delta_rule(q, k, v, g, beta, doc_ids=None):
    """Gated DeltaNet's recurrence, chunked: o [B, T, Hv, Dv] in v's dtype.

    q, k [B, T, Hk, Dk], already L2-normalised along Dk (q is scaled by Dk^-0.5 here); v [B, T, Hv, Dv]
    with Hv a multiple of Hk (each q/k head serves Hv / Hk consecutive v heads); g [B, T, Hv] the
    log-decay (<= 0), beta [B, T, Hv] in (0, 1); ``doc_ids`` int [B, T] non-decreasing along T
    (packed documents: the state restarts at zero at each document's first token), or None (one
    document per row). The state is carried in fp32. Differentiable in q, k, v, g and beta.
    Under TRITON_INTERPRET=1 bf16 rounds wrongly: test fp32 / fp16.
    """
    _check(q, k, v, g, beta, doc_ids)
    check_runnable("the Triton gated delta rule", __name__, _jit_interpreted, q)
    with torch.autocast(q.device.type, enabled=False):
        return GatedDeltaRule.apply(q, k, v, g, beta, doc_ids)


def _check(q, k, v, g, beta, doc_ids) -> None:
    if q.dim() != 4 or q.shape != k.shape or v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"q and k must be [B, T, Hk, Dk] and v [B, T, Hv, Dv]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    batch, length, heads_k, dim_k = q.shape
    heads_v, dim_v = v.shape[2:]
    if heads_v % heads_k:
        raise ValueError(f"the v heads ({heads_v}) must be a multiple of the q/k heads ({heads_k})")
    if dim_k not in HEAD_DIMS or dim_v not in HEAD_DIMS:
        raise ValueError(f"head dims must be one of {HEAD_DIMS}; got Dk={dim_k}, Dv={dim_v}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one of fp32, fp16, bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (batch, length, heads_v) or not x.is_floating_point():
            raise ValueError(f"{name} must be float [{batch}, {length}, {heads_v}]; got {x.dtype} {tuple(x.shape)}")
    if doc_ids is not None and (tuple(doc_ids.shape) != (batch, length) or doc_ids.is_floating_point()):
        raise ValueError(f"doc_ids must be int [{batch}, {length}]; got {doc_ids.dtype} {tuple(doc_ids.shape)}")


# ---------------------------------------------------------------------------------------
# Compile report
# ---------------------------------------------------------------------------------------

_FP32_POINTERS = {"G", "BETA", "GC", "W", "U", "TINV", "H", "VN", "DH", "DVN", "DQ", "DK_", "DBETA", "DG", "DGC"}
COMPILED_HEAD_DIMS = ((64, 64), (128, 128))  # (Dk, Dv): Qwen3.5 and Qwen3-Next take 128, 128


def compile_specs(dtype: str, head_dims=COMPILED_HEAD_DIMS) -> list[dict]:
    """Each kernel as a training run launches it (packed documents on, the backward's variants of
    _prepare and _scan), on each target at that target's config, for kernels/compile_report.py."""
    if triton is None:
        raise RuntimeError(f"triton is not importable ({IMPORT_ERROR})")
    specs = []
    for target, configs in (("sm_80", _CONFIGS["ampere"]), ("sm_90a", _CONFIGS["hopper"])):
        for dim_k, dim_v in head_dims:
            chunk, block_v, warps, stages = configs[dim_k]
            common = dict(HAS_DOCS=True, PRECISION=_precision(torch.float16), DK=dim_k, DV=dim_v, BT=chunk)
            kernels = {
                "prepare": (_prepare_kernel, dict(STORE_T=True, LOG2_BT=chunk.bit_length() - 1)),
                "scan": (_scan_kernel, dict(WRITE_OUT=True, STORE_STATES=False, BV=min(block_v, dim_v))),
                "rescan": (_scan_kernel, dict(WRITE_OUT=False, STORE_STATES=True, BV=min(block_v, dim_v))),
                "state_grad": (_state_grad_kernel, dict(BV=min(block_v, dim_v))),
                "grads_t": (_grads_through_t_kernel, dict(BV=min(block_v, dim_v), BK=_dk_block(dim_k))),
                "grads": (_grads_kernel, dict(BV=min(block_v, dim_v))),
            }
            for name, (fn, extra) in kernels.items():
                specs.append(_spec(f"gdr_{name}_dk{dim_k}", fn, target, dtype, {**common, **extra}, warps, stages,
                                   dim_v))
    return specs


def _spec(name, fn, target, dtype, constexprs, warps, stages, dim_v) -> dict:
    """One launch for the compile report: pointers and strides divisible by 16, T, the head counts
    and the scale not."""
    signature, divisible = {}, []
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg[0].isupper() and arg not in ("T", "HK", "HV"):
            signature[arg] = "*i32" if arg == "DOCS" else "*fp32" if arg in _FP32_POINTERS else "*" + dtype
            divisible.append(arg)
        else:
            signature[arg] = "fp32" if arg == "scale" else "i32"
    detail = f"BT={constexprs['BT']} BV={constexprs.get('BV', dim_v)} Dv={dim_v}"
    return dict(name=name, fn=fn, signature=signature, constexprs=constexprs, num_warps=warps, num_stages=stages,
                divisible=divisible, targets=[target], wgmma=False, detail=detail)
