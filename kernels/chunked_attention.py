"""Attention for the CPU: query chunks as batched matrix products, GQA native.

PyTorch's CPU flash kernel multiplies small tiles one (batch, head) at a time. Here the
queries of one chunk, for every head of a GQA group, form one matrix against the keys
they may see, so each step is one large ``bmm`` over batch * kv heads:

- forward, per chunk of ``c`` queries: scores ``[B*Hkv, c*g, e]`` against keys ``[0, e)``
  (causal: ``e`` is the chunk's end; keys after it are never touched), the causal mask
  on the diagonal ``c x c`` block only, softmax, times V. Packed rows (``doc_ids``):
  the keys start at the earliest document start of the chunk's first queries, and one
  mask [B, c, keys] hides other documents (no per-document calls);
- backward, per chunk: the probabilities are computed again (nothing of size T x T is
  kept), then dV, dP, dS = P * (dP - rowsum(dO * O)), dQ and dK, with dK and dV summed
  over the chunks that see each key.

Memory beyond the inputs and output is one chunk's scores, ``B*Hq*c*T`` floats. The
query heads of a group sit next to each other (rows ordered by position, then head in
group), so K and V are never repeated. BENCHMARKS.md compares it with SDPA's CPU flash
kernel, forward and backward.

Public API: :func:`chunked_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows of one chunk's score matrix (chunk length x heads per group): about the size at
# which the matrix products of W0's shapes run fastest on a 2-core CPU.
CHUNK_ROWS = 128


def chunked_attention(q, k, v, causal: bool = True, chunk: int | None = None, doc_ids=None):
    """softmax(q k^T / sqrt(D)) v for q [B, Hq, T, D], k and v [B, Hkv, T, D] (Hq a multiple of Hkv).

    ``doc_ids`` [B, T], non-decreasing along T: a query sees only keys of its own document.
    """
    if chunk is None:
        chunk = max(16, CHUNK_ROWS // (q.shape[1] // k.shape[1]))
    return _ChunkedAttention.apply(q, k, v, _plan(q.shape[2], chunk, causal, doc_ids))


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan):
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        qs = _grouped(q * d**-0.5, hkv)  # [B*Hkv, T*g, D], pre-scaled
        kf, vf = k.reshape(b * hkv, t, d), v.reshape(b * hkv, t, d)
        out = torch.empty_like(qs)
        for span in plan:
            rows, keys = slice(span.s0 * g, span.e * g), slice(span.lo, span.hi)
            p = _probabilities(qs[:, rows], kf[:, keys], span, b, g)
            out[:, rows] = torch.bmm(p, vf[:, keys])
        ctx.save_for_backward(qs, kf, vf, out)
        ctx.plan, ctx.shape = plan, (b, hq, hkv, t, d)
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
        for span in ctx.plan:
            rows, keys = slice(span.s0 * g, span.e * g), slice(span.lo, span.hi)
            qi, doi = qs[:, rows], dos[:, rows]
            p = _probabilities(qi, kf[:, keys], span, b, g)
            dv[:, keys] += torch.bmm(p.transpose(1, 2), doi)
            ds = torch.bmm(doi, vf[:, keys].transpose(1, 2)).sub_(delta[:, rows]).mul_(p)
            dq[:, rows] = torch.bmm(ds, kf[:, keys])
            dk[:, keys] += torch.bmm(ds.transpose(1, 2), qi)  # qi carries the scale
        dq = _ungrouped(dq.mul_(d**-0.5), b, hq, t, d)
        return dq, dk.view(b, hkv, t, d), dv.view(b, hkv, t, d), None


@dataclass
class _Span:
    """One chunk of queries [s0, e) and the keys [lo, hi) any of them may see.

    ``hidden``: [B, e - s0, hi - lo], True where a query may not see a key (packed rows);
    None for rows of one document, where only the causal diagonal block needs a mask.
    """

    s0: int
    e: int
    lo: int
    hi: int
    causal: bool
    hidden: torch.Tensor | None = None


def _plan(t: int, chunk: int, causal: bool, doc_ids) -> list[_Span]:
    firsts = list(range(0, t, chunk))
    ends = [min(s0 + chunk, t) for s0 in firsts]
    if doc_ids is None:
        return [_Span(s0, e, 0, e if causal else t, causal) for s0, e in zip(firsts, ends)]
    position = torch.arange(t, device=doc_ids.device)
    starts_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    starts_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    ends_doc = torch.ones_like(starts_doc)
    ends_doc[:, :-1] = starts_doc[:, 1:]
    doc_start = torch.where(starts_doc, position, 0).cummax(1).values  # [B, T]
    doc_end = torch.where(ends_doc, position + 1, t).flip(1).cummin(1).values.flip(1)  # [B, T]
    # Keys from the earliest start (over the batch) of a chunk's first query's document,
    # to the chunk's end (causal) or the latest end of its last query's document.
    los = doc_start[:, firsts].amin(0).tolist()
    his = ends if causal else doc_end[:, [e - 1 for e in ends]].amax(0).tolist()
    spans = []
    for s0, e, lo, hi in zip(firsts, ends, los, his):
        hidden = doc_ids[:, None, lo:hi] != doc_ids[:, s0:e, None]  # [B, n, m]
        if causal:
            hidden |= position[None, None, lo:hi] > position[None, s0:e, None]
        spans.append(_Span(s0, e, lo, hi, causal, hidden))
    return spans


def _probabilities(qi, keys, span: _Span, b: int, g: int):
    """Softmax of one chunk's scores [B*Hkv, (e - s0)*g, hi - lo], hidden keys masked."""
    scores = torch.bmm(qi, keys.transpose(1, 2))
    n = span.e - span.s0
    if span.hidden is not None:
        by_head = scores.view(b, -1, n, g, span.hi - span.lo)  # [B, Hkv, n, g, m]
        by_head.masked_fill_(span.hidden[:, None, :, None, :], float("-inf"))
    elif span.causal:
        diagonal = scores.view(scores.shape[0], n, g, -1)[..., span.s0 - span.lo :]  # [B*Hkv, n, g, n]
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
