"""The run's micro-batches: a pure function of the micro-batch index, prefetched by workers."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from sftplug.data.packing import PackedRows, Rows


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch ``m`` of a run as a pure function of ``m``: rows in a seeded order per epoch.

    Being a pure function makes the data position one integer (exact resume) and lets
    DataLoader workers prefetch without owning any state.
    """

    def __init__(self, rows: Rows | PackedRows, micro_bsz: int, seed: int, trim: bool = False, rank: int = 0,
                 world: int = 1):
        self.rows, self.micro_bsz, self.seed, self.trim = rows, micro_bsz, seed, trim
        self.rank, self.global_bsz = rank, micro_bsz * world  # each rank takes its slice of a global batch
        self.per_epoch = -(-len(rows) // self.global_bsz)  # the last one wraps around
        self._cached: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return 2**62  # endless: epochs follow each other

    def order(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._cached = (epoch, torch.randperm(len(self.rows), generator=generator).tolist())
        return self._cached[1]

    def picks(self, m: int) -> list[int]:
        epoch, j = divmod(m, self.per_epoch)
        order = self.order(epoch)
        first = j * self.global_bsz + self.rank * self.micro_bsz
        return [order[(first + i) % len(order)] for i in range(self.micro_bsz)]

    def __getitem__(self, m: int) -> dict:
        return batch_of(self.rows, self.picks(m), self.trim)

    def fill(self) -> float:
        """The share of the positions the micro-batches compute that hold tokens, over the first
        epoch's micro-batches of every rank (the rows :meth:`picks` gives): a row is ``seq_len``
        long, or with ``trim`` (rows of one document, ``--no-pack``) as long as its micro-batch's longest."""
        order = np.asarray(self.order(0))
        rows = order[np.arange(self.per_epoch * self.global_bsz) % len(order)].reshape(-1, self.micro_bsz)
        used = np.asarray(self.rows.used(np.arange(len(self.rows))))[rows]  # [micro-batches, micro_bsz]
        width = used.max(axis=1) if self.trim else np.full(len(used), self.rows.seq_len)
        return float(used.sum() / (width * self.micro_bsz).sum())


class _CountFrom(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


class Batches:
    """The run's stream of micro-batches; ``workers`` > 0 prefetches them in DataLoader workers."""

    def __init__(self, rows: Rows | PackedRows, micro_bsz: int, seed: int, workers: int = 0, pin_memory: bool = False,
                 trim: bool = False, rank: int = 0, world: int = 1):
        self.dataset = MicroBatches(rows, micro_bsz, seed, trim, rank, world)
        self.workers, self.pin_memory = workers, pin_memory
        self.position = 0  # micro-batches handed out so far
        self._stream = None

    def state(self) -> dict:
        return {"micro_batches": self.position}

    def restore(self, state: dict) -> None:
        self.position = int(state["micro_batches"])
        self._stream = None

    def next(self) -> dict:
        if self.workers == 0:
            batch = self.dataset[self.position]
        else:
            if self._stream is None:
                loader = torch.utils.data.DataLoader(
                    self.dataset, batch_size=None, sampler=_CountFrom(self.position), num_workers=self.workers,
                    pin_memory=self.pin_memory, persistent_workers=True, prefetch_factor=4,
                )  # fmt: skip
                self._stream = iter(loader)
            batch = next(self._stream)
        self.position += 1
        return batch

    def close(self) -> None:
        self._stream = None  # ends the workers


def batch_of(rows: Rows | PackedRows, picked, trim: bool = False) -> dict[str, torch.Tensor | None]:
    """The picked rows: input_ids, labels, positions (int64 [B, S]), doc_ids (int32 [B, S]; None when
    no picked row holds two documents: plain causal attention) and tokens (int: positions that are not
    padding). ``trim``: rows of one document each are cut to the longest of them."""
    return rows.batch(picked, trim)
