"""Attention for the CPU: query chunks as batched matrix products, GQA native.

PyTorch's CPU flash kernel multiplies small tiles one (batch, head) at a time. Here the
queries of one chunk, for every head of a GQA group, form one matrix against the keys
they may see, so each step is one large ``bmm`` over batch * kv heads:

- forward, per chunk of ``c`` queries: scores ``[B*Hkv, c*g, e]`` against keys ``[0, e)``
  (causal: ``e`` is the chunk's end; keys after it are never touched), the causal mask
  on the diagonal ``c x c`` block only, softmax, times V. Packed rows (``doc_ids``):
  the keys start at the earliest document start of the chunk's first queries, and one
  mask [B, c, keys] hides other documents (no per-document calls). A sliding window
  (``window``) starts each chunk's keys at its first query minus the window, and one
  mask [1|B, c, keys] hides the keys that fell out of each query's window. Soft-capped
  scores (``softcap``, Gemma 2) are ``c * tanh(s / c)`` before the mask and softmax.
  Sinks (``sinks`` [Hq], gpt-oss) join each row's denominator: the row's log-sum-exp takes
  the head's sink logit too, and P = exp(S - lse);
- backward, per chunk: the probabilities are computed again (nothing of size T x T is
  kept), then dV, dP, dS = P * (dP - rowsum(dO * O)) (soft-capped: times the cap's
  derivative 1 - tanh^2), dQ and dK, with dK and dV summed over the chunks that see each key.
  A sink is a logit whose value vector is 0, so rowsum(dO * O) is unchanged and its gradient
  is -P_sink * rowsum(dO * O), summed over the head's queries.

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


def chunked_attention(q, k, v, causal: bool = True, chunk: int | None = None, doc_ids=None, window: int = 0,
                      softcap: float = 0.0, scale: float | None = None, sinks=None):
    """softmax(q k^T * scale) v for q [B, Hq, T, D], k and v [B, Hkv, T, D] (Hq a multiple of Hkv).

    ``doc_ids`` [B, T], non-decreasing along T: a query sees only keys of its own document.
    ``window`` (causal only; 0: none): a query at i sees keys i - window < j <= i.
    ``softcap`` (0: none): scores s become softcap * tanh(s / softcap) before the softmax.
    ``scale``: the softmax scale, D ** -0.5 when None.
    ``sinks`` [Hq] (None: none): head h's logit s_h joins its rows' softmax denominators,
    p_ij = exp(z_ij) / (exp(s_h) + sum_j' exp(z_ij')); differentiable.
    """
    if window and not causal:
        raise ValueError("a sliding window is causal (keys i - window < j <= i): pass causal=True")
    if chunk is None:
        chunk = max(16, CHUNK_ROWS // (q.shape[1] // k.shape[1]))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    plan = _plan(q.shape[2], chunk, causal, doc_ids, window, q.device)
    return _ChunkedAttention.apply(q, k, v, plan, float(softcap), float(scale), sinks)


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, softcap, scale, sinks):
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        qs = _grouped(q * scale, hkv)  # [B*Hkv, T*g, D], pre-scaled
        kf, vf = k.reshape(b * hkv, t, d), v.reshape(b * hkv, t, d)
        sink = None if sinks is None else sinks.to(q.dtype).view(hkv, 1, g, 1)  # per (kv head, head in group)
        out = torch.empty_like(qs)
        for span in plan:
            rows, keys = slice(span.s0 * g, span.e * g), slice(span.lo, span.hi)
            p, _, _ = _probabilities(qs[:, rows], kf[:, keys], span, g, softcap, sink)
            out[:, rows] = torch.bmm(p, vf[:, keys])
        ctx.save_for_backward(qs, kf, vf, out, sinks)
        ctx.plan, ctx.shape, ctx.softcap, ctx.scale = plan, (b, hq, hkv, t, d), softcap, scale
        return _ungrouped(out, b, hq, t, d)

    @staticmethod
    def backward(ctx, grad_out):
        qs, kf, vf, out, sinks = ctx.saved_tensors
        b, hq, hkv, t, d = ctx.shape
        g = hq // hkv
        dos = _grouped(grad_out, hkv)
        delta = (dos * out).sum(-1, keepdim=True)  # [B*Hkv, T*g, 1]
        dq = torch.empty_like(qs)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        sink = None if sinks is None else sinks.to(qs.dtype).view(hkv, 1, g, 1)
        dsink = None if sinks is None else torch.zeros(hkv, g, dtype=qs.dtype, device=qs.device)
        for span in ctx.plan:
            rows, keys = slice(span.s0 * g, span.e * g), slice(span.lo, span.hi)
            qi, doi = qs[:, rows], dos[:, rows]
            p, capped, p_sink = _probabilities(qi, kf[:, keys], span, g, ctx.softcap, sink)
            if p_sink is not None:  # d/ds_h: -P_sink * rowsum(dO * O) over the head's rows
                dsink -= (p_sink * delta[:, rows].view_as(p_sink)).sum((0, 2, 4)).view(hkv, g)
            dv[:, keys] += torch.bmm(p.transpose(1, 2), doi)
            ds = torch.bmm(doi, vf[:, keys].transpose(1, 2)).sub_(delta[:, rows]).mul_(p)
            if capped is not None:  # d(c * tanh(s / c)) / ds = 1 - tanh^2
                ds.mul_(capped.square_().neg_().add_(1))
            dq[:, rows] = torch.bmm(ds, kf[:, keys])
            dk[:, keys] += torch.bmm(ds.transpose(1, 2), qi)  # qi carries the scale
        dq = _ungrouped(dq.mul_(ctx.scale), b, hq, t, d)
        dsinks = None if sinks is None else dsink.view(hq).to(sinks.dtype)
        return dq, dk.view(b, hkv, t, d), dv.view(b, hkv, t, d), None, None, None, dsinks


@dataclass
class _Span:
    """One chunk of queries [s0, e) and the keys [lo, hi) any of them may see.

    ``hidden``: [B|1, e - s0, hi - lo], True where a query may not see a key (packed rows,
    or a sliding window); None for rows of one document without a window, where only the
    causal diagonal block needs a mask.
    """

    s0: int
    e: int
    lo: int
    hi: int
    causal: bool
    hidden: torch.Tensor | None = None


def _plan(t: int, chunk: int, causal: bool, doc_ids, window: int = 0, device=None) -> list[_Span]:
    firsts = list(range(0, t, chunk))
    ends = [min(s0 + chunk, t) for s0 in firsts]
    if doc_ids is None:
        if not window:
            return [_Span(s0, e, 0, e if causal else t, causal) for s0, e in zip(firsts, ends)]
        position = torch.arange(t, device=device)
        spans = []
        for s0, e in zip(firsts, ends):
            lo = max(0, s0 - window + 1)  # the first query's window starts here
            spans.append(_Span(s0, e, lo, e, causal, _outside(position, s0, e, lo, e, window)[None]))
        return spans
    position = torch.arange(t, device=doc_ids.device)
    starts_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    starts_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    ends_doc = torch.ones_like(starts_doc)
    ends_doc[:, :-1] = starts_doc[:, 1:]
    doc_start = torch.where(starts_doc, position, 0).cummax(1).values  # [B, T]
    doc_end = torch.where(ends_doc, position + 1, t).flip(1).cummin(1).values.flip(1)  # [B, T]
    # Keys from the earliest start (over the batch) of a chunk's first query's document
    # (or of its window, if later), to the chunk's end (causal) or the latest end of its
    # last query's document.
    los = doc_start[:, firsts].amin(0).tolist()
    if window:
        los = [max(lo, s0 - window + 1) for lo, s0 in zip(los, firsts)]
    his = ends if causal else doc_end[:, [e - 1 for e in ends]].amax(0).tolist()
    spans = []
    for s0, e, lo, hi in zip(firsts, ends, los, his):
        hidden = doc_ids[:, None, lo:hi] != doc_ids[:, s0:e, None]  # [B, n, m]
        if causal:
            hidden |= _outside(position, s0, e, lo, hi, window)[None]
        spans.append(_Span(s0, e, lo, hi, causal, hidden))
    return spans


def _outside(position, s0: int, e: int, lo: int, hi: int, window: int):
    """[n, m]: True where key lo + j is after query s0 + i, or (window) at least ``window`` before it."""
    keys, queries = position[None, lo:hi], position[s0:e, None]
    hidden = keys > queries
    if window:
        hidden |= keys <= queries - window
    return hidden


def _probabilities(qi, keys, span: _Span, g: int, softcap: float = 0.0, sink=None):
    """Softmax of one chunk's scores [B*Hkv, (e - s0)*g, hi - lo], hidden keys masked.

    Soft-capped, also tanh(s / softcap) (for backward's derivative); else None. With
    ``sink`` [Hkv, 1, g, 1] (the sinks by kv head and head in group) each row's denominator
    takes exp(sink) too, and the sinks' probabilities [B, Hkv, n, g, 1] come third; else None.
    """
    scores = torch.bmm(qi, keys.transpose(1, 2))
    capped = None
    if softcap:
        capped = scores.div_(softcap).tanh_()
        scores = capped * softcap
    n = span.e - span.s0
    if span.hidden is not None:
        by_head = scores.view(span.hidden.shape[0], -1, n, g, span.hi - span.lo)  # [B|1, B*Hkv|Hkv, n, g, m]
        by_head.masked_fill_(span.hidden[:, None, :, None, :], float("-inf"))
    elif span.causal:
        diagonal = scores.view(scores.shape[0], n, g, -1)[..., span.s0 - span.lo :]  # [B*Hkv, n, g, n]
        diagonal.masked_fill_(_above_diagonal(n, scores.device), float("-inf"))
    if sink is None:
        return torch.softmax(scores, -1), capped, None
    by_row = scores.view(-1, sink.shape[0], n, g, scores.shape[-1])  # [B, Hkv, n, g, m]
    lse = torch.logaddexp(torch.logsumexp(by_row, -1, keepdim=True), sink)  # the sink in the denominator
    return by_row.sub_(lse).exp_().view_as(scores), capped, (sink - lse).exp_()


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
