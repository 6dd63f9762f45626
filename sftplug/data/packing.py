"""Tokenized documents -> fixed-length rows: best-fit decreasing packing, per-document positions.

A document of n tokens becomes n-1 training positions (input token t, target token t+1,
the target masked with IGNORE where it is not trained). Positions restart at 0 in each
document and ``doc_ids`` keep documents apart in attention; a document's last token is
never an input, so no position is trained to predict the next document's first token.

Tokens stay flat (:class:`PackedRows`: ids and trained flags, plus where each document
sits); a micro-batch's rows are built when it is asked for, so the dataset is never held
as [N, S] int64 arrays. :class:`Rows` is the dense form, for synthetic data and tests.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from sftplug.data.records import SHOW_LINES
from sftplug.errors import SftplugError

IGNORE = -100


def _batch(input_ids, labels, positions, doc_ids, single: bool, used, trim: bool) -> dict:
    """A micro-batch; rows of one document and trailing padding need plain causal attention only,
    and ``trim`` cuts the columns that are padding in every row. ``tokens``: the positions that
    hold documents (``used``, per row), padding left out; ``real`` [B, S] marks them (padding
    trails each row)."""
    batch = {"input_ids": input_ids, "labels": labels, "positions": positions, "doc_ids": None if single else doc_ids}
    if trim and single:
        longest = int(used.max())
        batch = {k: v[:, :longest] if v is not None else None for k, v in batch.items()}
    used = torch.as_tensor(used)
    batch["real"] = torch.arange(batch["input_ids"].shape[1])[None, :] < used[:, None]
    batch["tokens"] = int(used.sum())
    return batch


@dataclass
class Rows:
    """Dense rows [N, S] (synthetic data, tests); the same batch interface as :class:`PackedRows`."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    doc_ids: torch.Tensor
    docs_per_row: torch.Tensor  # [N] real documents in each row (padding not counted)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def used(self, picked) -> torch.Tensor:
        """Positions that hold documents (not padding) in each picked row."""
        return (self.doc_ids[picked] < self.docs_per_row[picked, None]).sum(1)

    def batch(self, picked, trim: bool = False) -> dict:
        """input_ids, labels, positions (int64 [B, S]), doc_ids (int32, None if no row packs two documents)
        and tokens (int: the positions that are not padding)."""
        single = int(self.docs_per_row[picked].max()) <= 1
        return _batch(self.input_ids[picked], self.labels[picked], self.positions[picked], self.doc_ids[picked],
                      single, self.used(picked), trim)

    def dense(self) -> Rows:
        return self


@dataclass
class PackedRows:
    """Rows kept as flat tokens and document placements; :meth:`batch` builds the rows it is asked for.

    Row r holds documents ``row_ptr[r]:row_ptr[r + 1]`` (in placement order: their doc ids
    0, 1, ...) side by side from column 0; document d is the ``need[d]`` input tokens
    ``ids[doc_start[d]:][:need[d]]``, its targets the tokens one further. The token arrays
    may be memory-mapped from the data cache.
    """

    ids: np.ndarray  # int32 [tokens]
    trained: np.ndarray  # bool or uint8 [tokens]: is this token a target the loss counts
    doc_start: np.ndarray  # int64 [documents]
    need: np.ndarray  # int32 [documents]: positions the document takes
    row_ptr: np.ndarray  # int64 [rows + 1]
    seq_len: int
    pad_id: int
    target_tokens: int

    def __post_init__(self):
        self.docs_per_row = torch.from_numpy(np.diff(self.row_ptr))

    def __len__(self) -> int:
        return len(self.row_ptr) - 1

    def _docs(self, picked: np.ndarray):
        """The documents of the picked rows in order: indices, row in the batch, rank in the row; per row, how many."""
        first = self.row_ptr[picked]
        count = self.row_ptr[picked + 1] - first
        offsets = np.cumsum(count) - count  # where each picked row's documents begin in the list
        slots = np.arange(int(count.sum()))
        docs = slots + np.repeat(first - offsets, count)
        return docs, np.repeat(np.arange(len(picked)), count), slots - np.repeat(offsets, count), count

    def used(self, picked) -> np.ndarray:
        """Positions that hold documents (not padding) in each picked row."""
        docs, _, _, count = self._docs(np.asarray(picked, dtype=np.int64))
        return np.add.reduceat(self.need[docs].astype(np.int64), np.cumsum(count) - count)

    def _gather(self, picked) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray]:
        """input_ids, labels, positions, doc_ids of the picked rows; their documents and used positions."""
        picked = np.asarray(picked, dtype=np.int64)
        n, seq_len = len(picked), self.seq_len
        docs, batch_row, rank, count = self._docs(picked)
        need = self.need[docs].astype(np.int64)
        ends = np.cumsum(need)
        begins = ends - need  # each document's first token in the batch's token list
        row_begins = begins[np.cumsum(count) - count]
        col = begins - np.repeat(row_begins, count)
        used = np.append(row_begins[1:], ends[-1]) - row_begins
        within = np.arange(int(ends[-1])) - np.repeat(begins, need)
        src = np.repeat(self.doc_start[docs], need) + within  # the input token
        dest = np.repeat(batch_row * seq_len + col, need) + within

        input_ids = np.full(n * seq_len, self.pad_id, dtype=np.int64)
        input_ids[dest] = self.ids[src]
        labels = np.full(n * seq_len, IGNORE, dtype=np.int64)
        labels[dest] = np.where(self.trained[src + 1], self.ids[src + 1], IGNORE)
        # Padding restarts positions and is a document of its own: nobody attends to it.
        positions = (np.arange(seq_len)[None, :] - used[:, None]).reshape(-1)
        positions[dest] = within
        doc_ids = np.repeat(count, seq_len).astype(np.int32)
        doc_ids[dest] = np.repeat(rank, need)
        arrays = [torch.from_numpy(a).view(n, seq_len) for a in (input_ids, labels, positions, doc_ids)]
        return arrays, count, used

    def batch(self, picked, trim: bool = False) -> dict:
        """input_ids, labels, positions (int64 [B, S]), doc_ids (int32, None if no row packs two documents)
        and tokens (int: the positions that are not padding)."""
        arrays, count, used = self._gather(picked)
        return _batch(*arrays, single=int(count.max()) <= 1, used=used, trim=trim)

    def dense(self) -> Rows:
        """Every row materialized (tests, small data): what the old dense packing held."""
        return Rows(*self._gather(np.arange(len(self)))[0], self.docs_per_row)


@dataclass
class Tokenized:
    """Many documents held in memory as flat arrays: document i is ids[starts[i]:starts[i+1]]."""

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


def doc_targets(trained: np.ndarray, lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Per document of consecutive ``lengths``: the trained targets a row of ``seq_len`` positions keeps."""
    starts = np.cumsum(lengths) - lengths
    need = np.clip(lengths - 1, 0, seq_len)
    trained_sum = np.zeros(len(trained) + 1, dtype=np.int64)
    np.cumsum(trained, out=trained_sum[1:])
    first = np.minimum(starts + 1, len(trained))
    return trained_sum[np.maximum(starts + 1 + need, first)] - trained_sum[first]


def _place(need: np.ndarray, seq_len: int, packed: bool):
    """Row and rank-in-row of each document, taken longest first (best-fit decreasing), and the rows."""
    n = len(need)
    order = np.argsort(-need, kind="stable")
    if not packed:
        row = np.empty(n, np.int64)
        row[order] = np.arange(n)
        return row, np.zeros(n, np.int64), n
    row, rank = np.empty(n, np.int64), np.empty(n, np.int64)
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
        row[i], rank[i] = r, members[r]
        used[r] += k
        members[r] += 1
        if used[r] < seq_len:
            bisect.insort(open_rows, (seq_len - used[r], r))
    return row, rank, len(used)


def plan(start, length, targets, lines, source: str, seq_len: int, packed: bool, overlong: str):
    """Where each document goes, and what happened to the others (truncated, dropped, ...).

    start, length, targets, lines: per document (its first token in the token store, its
    tokens, :func:`doc_targets`, its line). Returns ``(doc_start, need, row_ptr)`` as
    :class:`PackedRows` takes them, and the counts.
    """
    positions_needed = length - 1  # a document of n tokens trains n-1 positions
    over = positions_needed > seq_len
    need = np.minimum(positions_needed, seq_len)
    dropped = over & (overlong == "drop")
    untrainable = ~dropped & ((need < 1) | (targets == 0))
    keep = np.flatnonzero(~dropped & ~untrainable)
    truncated = over & ~dropped & ~untrainable
    counts = {}
    for name, mask in (("truncated", truncated), ("dropped", dropped), ("untrainable", untrainable)):
        counts[name] = int(mask.sum())
        counts[name + "_lines"] = [f"{source}:{n}" for n in lines[mask][:SHOW_LINES].tolist()]
    if not len(keep):
        raise SftplugError(
            f"{source}: no trainable examples: every record is empty, fully masked or dropped as overlong"
        )
    need = need[keep]
    row, rank, n_rows = _place(need, seq_len, packed)
    order = np.lexsort((rank, row))  # row by row, each row's documents in the order they were placed
    row_ptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=n_rows), out=row_ptr[1:])
    counts.update(documents=len(keep), tokens=int(need.sum()), target_tokens=int(targets[keep].sum()))
    return (np.asarray(start[keep][order], np.int64), need[order].astype(np.int32), row_ptr), counts
