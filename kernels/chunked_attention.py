"""Attention for the CPU: query chunks as batched matrix products, GQA native.

PyTorch's CPU flash kernel multiplies small tiles one (batch, head) at a time. Here the
queries of one chunk, for every head of a GQA group, form one matrix against the keys
they may see, so each step is one large ``bmm`` over batch * kv heads:

- forward, per chunk of ``c`` queries: scores ``[B*Hkv, c*g, e]`` against keys ``[0, e)``
  (causal: ``e`` is the chunk's end; keys after it are never touched), the causal mask
  on the diagonal ``c x c`` block only, softmax, times V;
- backward, per chunk: the probabilities are computed again (nothing of size T x T is
  kept), then dV, dP, dS = P * (dP - rowsum(dO * O)), dQ and dK, with dK and dV summed
  over the chunks that see each key.

Memory beyond the inputs and output is one chunk's scores, ``B*Hq*c*T`` floats. The
query heads of a group sit next to each other (rows ordered by position, then head in
group), so K and V are never repeated. At W0's shapes this takes about 0.7x the time of
SDPA's CPU flash kernel, forward and backward (BENCHMARKS.md).

Public API: :func:`chunked_attention`.
"""

from __future__ import annotations

import torch

# Rows of one chunk's score matrix (chunk length x heads per group): about the size at
# which the matrix products of W0's shapes run fastest on a 2-core CPU.
CHUNK_ROWS = 128


def chunked_attention(q, k, v, causal: bool = True, chunk: int | None = None):
    """softmax(q k^T / sqrt(D)) v for q [B, Hq, T, D], k and v [B, Hkv, T, D] (Hq a multiple of Hkv)."""
    if chunk is None:
        chunk = max(16, CHUNK_ROWS // (q.shape[1] // k.shape[1]))
    return _ChunkedAttention.apply(q, k, v, causal, chunk)


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, chunk: int):
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        qs = _grouped(q * d**-0.5, hkv)  # [B*Hkv, T*g, D], pre-scaled
        kf, vf = k.reshape(b * hkv, t, d), v.reshape(b * hkv, t, d)
        out = torch.empty_like(qs)
        for s0, e, keys in _chunks(t, chunk, causal):
            rows = slice(s0 * g, e * g)
            p = _probabilities(qs[:, rows], kf[:, :keys], s0, e, g, causal)
            out[:, rows] = torch.bmm(p, vf[:, :keys])
        ctx.save_for_backward(qs, kf, vf, out)
        ctx.causal, ctx.chunk, ctx.shape = causal, chunk, (b, hq, hkv, t, d)
        return _ungrouped(out, b, hq, t, d)

    @staticmethod
    def backward(ctx, grad_out):
        qs, kf, vf, out = ctx.saved_tensors
        b, hq, hkv, t, d = ctx.shape
        g = hq // hkv
        dos = _grouped(grad_out, hkv)
        delta = (dos * out).sum(-1, keepdim=True)  # [B*Hkv, T*g, 1]
        dq = torch.empty_like(qs)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        for s0, e, keys in _chunks(t, ctx.chunk, ctx.causal):
            rows = slice(s0 * g, e * g)
            qi, doi = qs[:, rows], dos[:, rows]
            p = _probabilities(qi, kf[:, :keys], s0, e, g, ctx.causal)
            dv[:, :keys] += torch.bmm(p.transpose(1, 2), doi)
            ds = torch.bmm(doi, vf[:, :keys].transpose(1, 2)).sub_(delta[:, rows]).mul_(p)
            dq[:, rows] = torch.bmm(ds, kf[:, :keys])
            dk[:, :keys] += torch.bmm(ds.transpose(1, 2), qi)  # qi carries the scale
        dq = _ungrouped(dq.mul_(d**-0.5), b, hq, t, d)
        return dq, dk.view(b, hkv, t, d), dv.view(b, hkv, t, d), None, None


def _chunks(t: int, chunk: int, causal: bool):
    """(first query, end query, number of keys seen) for each chunk of queries."""
    for s0 in range(0, t, chunk):
        e = min(s0 + chunk, t)
        yield s0, e, e if causal else t


def _probabilities(qi, keys, s0: int, e: int, g: int, causal: bool):
    """Softmax of one chunk's scores [B*Hkv, (e - s0)*g, n_keys], masked above the diagonal."""
    scores = torch.bmm(qi, keys.transpose(1, 2))
    if causal:
        n = e - s0
        diagonal = scores.view(scores.shape[0], n, g, -1)[..., s0:]  # [B*Hkv, n, g, n]
        diagonal.masked_fill_(_above_diagonal(n, scores.device), float("-inf"))
    return torch.softmax(scores, -1)


_MASKS: dict[tuple, torch.Tensor] = {}


def _above_diagonal(n: int, device) -> torch.Tensor:
    key = (n, str(device))
    if key not in _MASKS:
        _MASKS[key] = torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)[:, None, :]  # [n, 1, n]
    return _MASKS[key]


def _grouped(x, hkv: int):
    """[B, Hq, T, D] -> [B*Hkv, T*g, D]: a group's query heads side by side at each position."""
    b, hq, t, d = x.shape
    return x.reshape(b, hkv, hq // hkv, t, d).transpose(2, 3).reshape(b * hkv, t * (hq // hkv), d)


def _ungrouped(x, b: int, hq: int, t: int, d: int):
    """The inverse of :func:`_grouped`."""
    hkv = x.shape[0] // b
    return x.view(b, hkv, t, hq // hkv, d).transpose(2, 3).reshape(b, hq, t, d)
