"""Packed rows for PyTorch's SDPA kernels, which see one document per row: documents batched by length.

A row of ``doc_ids`` [B, T] (non-decreasing along T) holds several documents.
:class:`PackPlan` gathers the documents of a batch into a few dense SDPA calls of equal
(causal: padded) length, so no T x T mask is ever built and the extra memory is O(T).
Causal padding is exact: a query never sees the padded keys after it. Non-causal batches
use exact lengths.

Public API: :func:`one_document_per_row`, :func:`document_lengths`, :func:`pack_plan`,
:class:`PackPlan`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def one_document_per_row(doc_ids: torch.Tensor) -> bool:
    """True when no row of ``doc_ids`` [B, T] holds two documents (one host sync)."""
    return doc_ids.shape[1] == 0 or bool((doc_ids[:, :1] == doc_ids).all())


def document_lengths(doc_ids: torch.Tensor) -> list[list[int]]:
    """Lengths of the runs of equal ids in each row (one host sync)."""
    return [torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in doc_ids.cpu()]


def bucket_length(length: int, limit: int) -> int:
    """Causal padding target: at most 25% longer, so a row's documents share few calls."""
    granule = max(8, (1 << (length.bit_length() - 1)) // 4)
    return min(-(-length // granule) * granule, limit)


class PackPlan:
    """How one packed ``doc_ids`` batch maps to a few dense attention calls.

    ``buckets``: (padded length L, number of documents n, flat gather index [n * L]);
    ``take``: for every flat position b * T + t, its row in the concatenated outputs.
    """

    def __init__(self, doc_ids: torch.Tensor, causal: bool, device=None):
        device = doc_ids.device if device is None else device  # where the attention runs
        B, T = doc_ids.shape
        groups: dict[int, list[tuple[int, int]]] = {}  # L -> [(flat start, length)]
        for b, lengths in enumerate(document_lengths(doc_ids)):
            start = b * T
            for length in lengths:
                L = bucket_length(length, T) if causal else length
                groups.setdefault(L, []).append((start, length))
                start += length
        take = torch.empty(B * T, dtype=torch.long)
        self.buckets = []
        self.calls = len(groups)
        offset = 0
        for L, docs in sorted(groups.items()):
            starts = torch.tensor([s for s, _ in docs])[:, None]  # [n, 1]
            lengths = torch.tensor([n for _, n in docs])[:, None]  # [n, 1]
            row_end = (starts // T + 1) * T  # [n, 1]
            j = torch.arange(L)[None, :]  # [1, L]
            index = torch.minimum(starts + j, row_end - 1)  # [n, L] padded keys: never seen
            valid = j < lengths  # [n, L]
            slots = offset + torch.arange(len(docs) * L).view(len(docs), L)
            take[index[valid]] = slots[valid]
            self.buckets.append((L, len(docs), _to(index.flatten(), device)))
            offset += len(docs) * L
        self.take = _to(take, device)
        self.shape = (B, T)

    def attend(self, q, k, v, causal: bool, gqa: bool, scale: float | None = None, mask_of=None):
        """One SDPA call per bucket (in whichever kernel the caller enabled), scattered back to rows.

        ``mask_of(L)``: the attention mask of a bucket of length L (a sliding window's band),
        applied instead of ``is_causal``; exact because a bucket's positions are its documents'
        own (each starts at 0, causal padding after its end).
        """
        # q: [B, Hq, T, D] -> flat [B*T, Hq, D]; same for k, v with Hkv heads
        B, T = self.shape
        flat = [x.transpose(1, 2).reshape(B * T, x.shape[1], x.shape[3]) for x in (q, k, v)]
        outs = []
        for L, n, index in self.buckets:
            qb, kb, vb = (x.index_select(0, index).view(n, L, *x.shape[1:]).transpose(1, 2) for x in flat)
            mask = mask_of(L) if mask_of is not None else None
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=causal and mask is None,
                                                scale=scale, enable_gqa=gqa)  # [n, Hq, L, D]
            outs.append(ob.transpose(1, 2).reshape(n * L, q.shape[1], q.shape[3]))
        out = torch.cat(outs).index_select(0, self.take)  # [B*T, Hq, D]
        return out.view(B, T, q.shape[1], q.shape[3]).transpose(1, 2)  # [B, Hq, T, D]


def _to(index: torch.Tensor, device) -> torch.Tensor:
    """A host index on the attention's device: pinned, so the copy neither blocks nor syncs."""
    device = torch.device(device)
    if device.type == "cuda" and index.device.type == "cpu":
        index = index.pin_memory()
    return index.to(device, non_blocking=True)


_plan_cache: tuple[torch.Tensor, bool, torch.device, PackPlan | None] | None = None


def pack_plan(doc_ids: torch.Tensor, causal: bool, device=None) -> PackPlan | None:
    """The plan for ``doc_ids`` (None when every row is one document), cached across layers.

    Every layer of one forward gets the same ``doc_ids`` tensor, so the plan is built once
    per batch, not once per layer. Built from host ``doc_ids`` it reads nothing back from
    the GPU; ``device`` is where the attention runs (default: doc_ids' own).
    """
    global _plan_cache
    device = doc_ids.device if device is None else torch.device(device)
    if _plan_cache is not None and _plan_cache[0] is doc_ids and _plan_cache[1:3] == (causal, device):
        return _plan_cache[3]
    plan = None if one_document_per_row(doc_ids) else PackPlan(doc_ids, causal, device)
    _plan_cache = (doc_ids, causal, device, plan)
    return plan
