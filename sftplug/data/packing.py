"""Tokenised documents -> fixed-length rows: best-fit decreasing packing, per-document positions.

A document of n tokens becomes n-1 training positions (input token t, target token t+1,
the target masked with IGNORE where it is not trained). Positions restart at 0 in each
document and ``doc_ids`` keep documents apart in attention; a document's last token is
never an input, so no position is trained to predict the next document's first token.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from sftplug.data.records import SHOW_LINES
from sftplug.errors import SftplugError

IGNORE = -100


@dataclass
class Rows:
    """Fixed-length rows [N, S]: what the trainer iterates over."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    doc_ids: torch.Tensor
    docs_per_row: torch.Tensor  # [N] real documents in each row (padding not counted)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


@dataclass
class Tokenized:
    """Many documents as flat arrays: document i is ids[starts[i]:starts[i+1]]."""

    ids: np.ndarray  # int32 [total tokens]
    trained: np.ndarray  # bool [total tokens]: is this token a target the loss counts
    starts: np.ndarray  # int64 [n + 1]
    lines: np.ndarray  # int64 [n]: the record's line in its file
    source: str = ""

    def __len__(self) -> int:
        return len(self.starts) - 1

    @classmethod
    def concat(cls, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], lines, source: str) -> "Tokenized":
        ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
        trained = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, bool)
        lengths = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
        starts = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        return cls(ids, trained, starts, np.asarray(lines, dtype=np.int64), source)

    def subset(self, index) -> "Tokenized":
        index = np.asarray(index, dtype=np.int64)
        lengths = (self.starts[1:] - self.starts[:-1])[index]
        starts = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        src = np.repeat(self.starts[:-1][index] - starts[:-1], lengths) + np.arange(starts[-1])
        return Tokenized(self.ids[src], self.trained[src], starts, self.lines[index], self.source)


def _place(need: np.ndarray, seq_len: int, packed: bool):
    """Row, column and rank-in-row of each document, taken longest first (best-fit decreasing)."""
    n = len(need)
    order = np.argsort(-need, kind="stable")
    if not packed:
        row = np.empty(n, np.int64)
        row[order] = np.arange(n)
        return row, np.zeros(n, np.int64), np.zeros(n, np.int64), n
    row, col, rank = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    open_rows: list[tuple[int, int]] = []  # (free positions, row), sorted: best fit = first that fits
    used: list[int] = []
    members: list[int] = []
    for i, k in zip(order.tolist(), need[order].tolist()):
        slot = bisect.bisect_left(open_rows, (k, -1))
        if slot < len(open_rows):
            _, r = open_rows.pop(slot)
        else:
            r = len(used)
            used.append(0)
            members.append(0)
        row[i], col[i], rank[i] = r, used[r], members[r]
        used[r] += k
        members[r] += 1
        if used[r] < seq_len:
            bisect.insort(open_rows, (seq_len - used[r], r))
    return row, col, rank, len(used)


def pack_tokenized(docs: Tokenized, seq_len: int, pad_id: int, packed: bool, overlong: str) -> tuple[Rows, dict]:
    """Rows from tokenised documents, and what happened to them (truncated, dropped, ...)."""
    starts = docs.starts[:-1]
    length = docs.starts[1:] - starts
    positions_needed = length - 1  # a document of n tokens trains n-1 positions
    over = positions_needed > seq_len
    need = np.minimum(positions_needed, seq_len)
    trained_sum = np.zeros(len(docs.trained) + 1, dtype=np.int64)
    np.cumsum(docs.trained, out=trained_sum[1:])
    targets = trained_sum[starts + 1 + need] - trained_sum[np.minimum(starts + 1, len(docs.trained))]
    dropped = over & (overlong == "drop")
    untrainable = ~dropped & ((need < 1) | (targets == 0))
    keep = np.flatnonzero(~dropped & ~untrainable)
    truncated = over & ~dropped & ~untrainable
    counts = {}
    for name, mask in (("truncated", truncated), ("dropped", dropped), ("untrainable", untrainable)):
        counts[name] = int(mask.sum())
        counts[name + "_lines"] = [f"{docs.source}:{n}" for n in docs.lines[mask][:SHOW_LINES].tolist()]
    if not len(keep):
        raise SftplugError(
            f"{docs.source}: no trainable examples: every record is empty, fully masked or dropped as overlong"
        )
    need = need[keep]
    row, col, rank, n_rows = _place(need, seq_len, packed)
    total = int(need.sum())
    doc_of = np.repeat(np.arange(len(keep)), need)
    within = np.arange(total) - np.repeat(np.cumsum(need) - need, need)
    src = starts[keep][doc_of] + within  # the input token
    dest = (row * seq_len + col)[doc_of] + within
    used = np.bincount(row, weights=need, minlength=n_rows).astype(np.int64)
    docs_per_row = np.bincount(row, minlength=n_rows).astype(np.int64)

    input_ids = np.full(n_rows * seq_len, pad_id, dtype=np.int64)
    input_ids[dest] = docs.ids[src]
    labels = np.full(n_rows * seq_len, IGNORE, dtype=np.int64)
    labels[dest] = np.where(docs.trained[src + 1], docs.ids[src + 1], IGNORE)
    # Padding restarts positions and is a document of its own: nobody attends to it.
    positions = (np.arange(seq_len)[None, :] - used[:, None]).reshape(-1)
    positions[dest] = within
    doc_ids = np.repeat(docs_per_row, seq_len).astype(np.int32)
    doc_ids[dest] = rank[doc_of]
    shape = (n_rows, seq_len)
    rows = Rows(
        torch.from_numpy(input_ids).view(shape),
        torch.from_numpy(labels).view(shape),
        torch.from_numpy(positions).view(shape),
        torch.from_numpy(doc_ids).view(shape),
        torch.from_numpy(docs_per_row),
    )
    counts.update(documents=len(keep), tokens=total, target_tokens=int((labels != IGNORE).sum()))
    return rows, counts
