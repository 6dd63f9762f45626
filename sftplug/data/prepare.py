"""Records -> chat template -> tokens and loss mask -> packed rows, cached on disk and memory-mapped.

:func:`prepare_data` is the entry point the trainer calls. The steps:

1. Read the records of a data source, streamed (:mod:`sftplug.data.sources`: JSONL, JSON,
   gzip, parquet, a ``datasets`` folder; line or row numbers kept), ``field_map`` renaming
   fields. The record format is detected once per file or given (:mod:`sftplug.data.records`).
2. Check each record; a bad one is an error naming file, line and problem
   (:class:`SftplugError`, exit code 2), or is skipped and counted with
   ``skip_bad_records``.
3. Render messages with the chat template and tokenize them with their loss masks, a
   chunk of records at a time, in file order (:mod:`sftplug.data.tokenizing`; worker
   processes on machines with the cores for them). A record is one example (document), or
   one per assistant turn where the template renders earlier turns differently as the
   conversation grows; the eval split keeps a record's examples together.
4. Each chunk's tokens are appended to the cache entry's files as they come (ids int32,
   trained flags bool: 5 bytes per token on disk); memory holds a few chunks and, per
   document, its start, length, targets and line.
5. Place documents into rows of ``seq_len`` positions by best-fit decreasing
   (:mod:`sftplug.data.packing`); the rows themselves are built per micro-batch.
6. The entry (:mod:`sftplug.data.cache`) sits under a hash of everything that decides it;
   every run, the first included, memory-maps it.
   Without a cache folder (tests, ``data preview``) the tokens are kept in memory.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sftplug.data import sources
from sftplug.data.cache import LAYOUT, Cache, cache_key, map_tokens
from sftplug.data.packing import PackedRows, doc_targets, plan
from sftplug.data.records import SHOW_LINES, BadLog
from sftplug.data.stats import DataStats
from sftplug.data.tokenizer import Tokenizer
from sftplug.data.tokenizing import Problems, tokenize_source
from sftplug.errors import SftplugError


@dataclass
class Prepared:
    """What :func:`prepare_data` hands the trainer."""

    train: PackedRows
    eval: PackedRows | None
    stats: DataStats | None = None  # None for rows built elsewhere (tests hand build_run their own)

    def describe(self, batch_fill: float | None = None) -> str:
        """The run header's data line (:meth:`DataStats.describe`)."""
        return self.stats.describe(batch_fill)


# -- reading and checking records ----------------------------------------------------
def _records(path, bad, field_map):
    """(line, record) of a data source: the one place records come from."""
    return sources.iter_records(path, bad, field_map)

class _Store:
    """Tokens appended chunk by chunk, to files in a folder or (no folder) to memory; per-document arrays."""

    def __init__(self, folder: Path | None, seq_len: int):
        self.seq_len, self.tokens, self.documents, self.records = seq_len, 0, 0, 0
        self.files = [open(folder / name, "wb") for name in ("ids.bin", "trained.bin")] if folder else None
        self.in_memory: list[tuple[np.ndarray, np.ndarray]] = []
        self.lengths, self.targets, self.lines, self.owners = [], [], [], []

    def add(self, ids, trained, lengths, lines, owners) -> None:
        """One chunk's examples; ``owners``: each one's record among the chunk's (0, 1, ...)."""
        if self.files:
            ids.tofile(self.files[0])
            trained.tofile(self.files[1])
        else:
            self.in_memory.append((ids, trained))
        self.lengths.append(lengths)
        self.targets.append(doc_targets(trained, lengths, self.seq_len))
        self.lines.append(lines)
        self.owners.append(owners + self.records)
        self.tokens += len(ids)
        self.documents += len(lengths)
        self.records += int(owners[-1]) + 1 if len(owners) else 0

    def close(self) -> tuple[np.ndarray, ...]:
        """The token arrays if held in memory (else None, None), and per document: start, length, targets, line,
        record (0, 1, ... over all sources)."""
        for f in self.files or ():
            f.close()
        tokens = [np.concatenate(a) for a in zip(*self.in_memory)] if self.in_memory else [None, None]
        length, targets, lines, owners = (np.concatenate(a) for a in (self.lengths, self.targets, self.lines,
                                                                       self.owners))
        self.lengths, self.targets, self.lines, self.owners, self.in_memory = [], [], [], [], []
        return *tokens, np.cumsum(length) - length, length, targets, lines, owners


def _split_order(n: int, fraction: float, seed: int) -> tuple[np.ndarray, int]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator).numpy(), max(1, int(round(n * fraction)))


# -- the entry point ---------------------------------------------------------------
def prepare_data(
    tokenizer: Tokenizer,
    *,
    data: str | Path,
    eval_data: str | Path | None = None,
    eval_split: float = 0.0,
    seq_len: int,
    pack: bool = True,
    fmt: str = "auto",
    train_on_prompt: bool = False,
    train_turns: str = "all",
    overlong: str = "truncate",
    skip_bad_records: bool = False,
    field_map: dict[str, str] | None = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> Prepared:
    """Training (and held-out) rows for a run, mapped from the cache when nothing has changed.

    The options are TrainConfig's, already checked there.

    tokenizer: the model's Tokenizer (its chat template already chosen).
    data: training records (any source :mod:`sftplug.data.sources` reads).
    eval_data: held-out records; or eval_split: the fraction of ``data`` held out (seeded).
    seq_len: positions per row; pack: several documents per row (best-fit decreasing).
    fmt: "auto" (detected per file) or one of records.FORMATS.
    train_on_prompt: train every token, not only assistant turns.
    train_turns: "all" assistant turns (each in the context the template renders when it is
    generated) or only the "last" one of each conversation.
    overlong: "truncate" or "drop" documents longer than seq_len + 1 tokens.
    skip_bad_records: skip and count bad records instead of stopping at the first.
    field_map: record fields renamed before anything else reads them ({"question": "prompt"}).
    cache_dir: where the tokenized data is cached (None: no cache, the tokens kept in memory).
    seed: decides the eval split.
    """
    started = time.perf_counter()
    options = dict(
        seq_len=seq_len, pack=bool(pack), fmt=fmt, train_on_prompt=bool(train_on_prompt),
        train_turns=train_turns, overlong=overlong,
        eval_split=float(eval_split), seed=int(seed), skip_bad_records=bool(skip_bad_records),
        field_map=dict(field_map) if field_map else None,
    )  # fmt: skip
    # An entry is keyed by the files' contents, the tokenizer and every option that changes a row.
    data_sha256 = sources.fingerprint(data)
    eval_sha256 = sources.fingerprint(eval_data) if eval_data else None
    cache = Cache(cache_dir, cache_key(data_sha256, eval_sha256, tokenizer, options)) if cache_dir else None
    hit = cache.load() if cache is not None else None
    if hit is not None:
        return _mapped(hit, data, data_sha256, tokenizer, started)
    # A miss: tokenized into a new entry's folder, put in place whole (or into memory, without a cache).
    folder, cache_note = None, None
    if cache is not None:
        try:
            folder = cache.begin()
        except OSError as exc:
            cache_note = f"not written ({exc.strerror})"
    try:
        prepared = _prepare(tokenizer, data, eval_data, folder, options, started)
        prepared.stats.data_sha256, prepared.stats.cache = data_sha256, "miss" if folder else cache_note
        if folder is not None:
            prepared.stats.cache_file = str(cache.entry)
            cache.commit(folder, prepared.train, prepared.eval, prepared.stats)
        return prepared
    except OSError as exc:
        raise SftplugError(f"{cache_dir}: cannot write the data cache ({exc.strerror or exc})") from None
    finally:
        if folder is not None and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)


def _mapped(hit: tuple, data, data_sha256: str, tokenizer: Tokenizer, started: float) -> Prepared:
    """A cache entry's rows, its stats brought up to date: the same text may have moved, and the
    tokenizer's template file be named anew."""
    prepared = Prepared(*hit)
    stats = prepared.stats
    stats.cache, stats.load_seconds = "hit", time.perf_counter() - started
    stats.data, stats.data_sha256 = str(data), data_sha256
    stats.chat_template, stats.chat_template_warning = tokenizer.template_source, tokenizer.template_warning
    return prepared


class _File(NamedTuple):
    """One data file, tokenized into the store."""

    path: str
    records: int
    format: str
    without_eos: int  # assistant turns that do not end with EOS


class _Part(NamedTuple):
    """The training or the held-out part: its records' examples placed into rows."""

    records: int
    examples: int
    rows: PackedRows | None
    counts: dict  # plan()'s: tokens, target_tokens, truncated, dropped, untrainable (each with its _lines)


_NO_PART = _Part(0, 0, None, {})  # where nothing is held out


def _prepare(tokenizer: Tokenizer, data, eval_data, folder: Path | None, options: dict, started: float) -> Prepared:
    """Tokenize, split and place; the tokens go to ``folder`` (or memory)."""
    bad = BadLog(options["skip_bad_records"])
    store = _Store(folder, options["seq_len"])
    # The training file's records first: records and their examples are numbered in that order.
    files = [_tokenize(path, tokenizer, options, bad, store) for path in (data, eval_data) if path]
    ids, trained, start, length, targets, lines, owners = store.close()
    # Held out: the eval file's records, or a seeded fraction of the training file's.
    is_eval = _held_out_records(files, options)
    # Split by record: one conversation's examples are never split between train and eval.
    examples = {"train": np.flatnonzero(~is_eval[owners])}
    if eval_data or options["eval_split"]:
        examples["eval"] = np.flatnonzero(is_eval[owners])
    # Each part's documents into rows of seq_len positions (only where they start and end).
    layouts, counts = {}, {}
    for part, index in examples.items():
        source = files[-1].path if part == "eval" and eval_data else files[0].path
        layouts[part], counts[part] = plan(start[index], length[index], targets[index], lines[index], source,
                                           options["seq_len"], options["pack"], options["overlong"])
    if folder is not None:  # the rows map the files they will be read from
        for part, layout in layouts.items():
            for name, array in zip(LAYOUT, layout):
                np.save(folder / f"{part}.{name}.npy", array, allow_pickle=False)
        ids, trained = map_tokens(folder, store.tokens)
    parts = {}
    for part, layout in layouts.items():
        rows = PackedRows(ids, trained, *layout, options["seq_len"], tokenizer.pad_id, counts[part]["target_tokens"])
        records = int((is_eval == (part == "eval")).sum())
        parts[part] = _Part(records, len(examples[part]), rows, counts[part])
    stats = _stats(files, parts, bad, tokenizer, options, time.perf_counter() - started)
    return Prepared(parts["train"].rows, parts["eval"].rows if "eval" in parts else None, stats)


def _tokenize(path, tokenizer: Tokenizer, options: dict, bad: BadLog, store: _Store) -> _File:
    """A data file's records tokenized into the store; a file without a usable record is an error."""
    bad_before, records_before = bad.count, store.records
    problems = Problems()
    records = _records(path, problems, options["field_map"])
    file_format, without_eos = tokenize_source(path, records, problems, tokenizer, options["fmt"],
                                               options["train_on_prompt"], bad, store.add, options["train_turns"])
    n = store.records - records_before
    if not n:
        skipped = bad.count - bad_before
        if skipped:
            raise SftplugError(f"{path}: no usable records: all {skipped:,} were bad (first: {bad.first[0]})")
        raise SftplugError(f"{path}: no records (the file is empty)")
    return _File(str(path), n, file_format or options["fmt"], without_eos)


def _held_out_records(files: list[_File], options: dict) -> np.ndarray:
    """Per record (training file's, then eval file's): is it held out."""
    n_train = files[0].records
    is_eval = np.zeros(sum(file.records for file in files), dtype=bool)
    is_eval[n_train:] = True
    eval_split = options["eval_split"]
    if eval_split:
        order, n_eval = _split_order(n_train, eval_split, options["seed"])
        if n_eval >= n_train:
            raise SftplugError(f"{files[0].path}: {n_train} records are too few for --eval-split {eval_split}")
        is_eval[order[:n_eval]] = True
    return is_eval


def _stats(files: list[_File], parts: dict[str, _Part], bad: BadLog, tokenizer: Tokenizer, options: dict,
           seconds: float) -> DataStats:
    """What came of the files, the options that decided it, and how long it took."""
    train, held_out = parts["train"], parts.get("eval", _NO_PART)
    n_records = sum(file.records for file in files)
    documents = {}  # cut, dropped or without a target, in both parts
    for name in ("truncated", "dropped", "untrainable"):
        documents[name] = train.counts[name] + held_out.counts.get(name, 0)
        lines = train.counts[name + "_lines"] + held_out.counts.get(name + "_lines", [])
        documents[name + "_lines"] = lines[:SHOW_LINES]
    return DataStats(
        data=files[0].path,
        eval_data=files[1].path if len(files) > 1 else None,
        format=files[0].format,
        formats={file.path: file.format for file in files},
        chat_template=tokenizer.template_source,
        chat_template_warning=tokenizer.template_warning,
        records=train.records,
        eval_records=held_out.records,
        examples=train.examples,
        eval_examples=held_out.examples,
        skipped_bad=bad.count,
        skipped_bad_lines=bad.first,
        rows=len(train.rows),
        eval_rows=len(held_out.rows) if held_out.rows is not None else 0,
        tokens=train.counts["tokens"],
        target_tokens=train.counts["target_tokens"],
        eval_target_tokens=held_out.counts.get("target_tokens", 0),
        fill=train.counts["tokens"] / (len(train.rows) * options["seq_len"]),
        assistant_turns_without_eos=sum(file.without_eos for file in files),
        seconds=seconds,
        records_per_s=n_records / max(seconds, 1e-9),
        **options,
        **documents,
    )
