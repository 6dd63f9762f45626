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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sftplug.data import sources
from sftplug.data.cache import LAYOUT, Cache, cache_key, map_tokens
from sftplug.data.packing import PackedRows, doc_targets, plan
from sftplug.data.records import SHOW_LINES, BadLog
from sftplug.data.tokenizer import Tokenizer
from sftplug.data.tokenizing import Problems, tokenize_source
from sftplug.errors import SftplugError


@dataclass
class Prepared:
    """What :func:`prepare_data` hands the trainer."""

    train: PackedRows
    eval: PackedRows | None
    stats: dict = field(default_factory=dict)

    def describe(self, batch_fill: float | None = None) -> str:
        """One line for the run header; ``batch_fill``: the fill of micro-batches cut to their
        longest row (``--no-pack``, :meth:`MicroBatches.fill`), where training cuts them."""
        s = self.stats
        length, how, counted = s["seq_len"], f"packed, {s['fill']:.0%} filled", ""
        if not s["pack"]:
            how, counted = f"one per row, {s['fill']:.0%} filled", "; tok/s counts tokens, not padding"
        if batch_fill is not None:
            length = f"up to {length}"
            how = f"one per row, each micro-batch cut to its longest row: {batch_fill:.0%} filled"
        parts = [
            f"data: {s['records']:,} {s['format']} records{_examples(s.get('examples'), s['records'])} -> "
            f"{s['rows']:,} rows of {length} ({how}, {s['target_tokens']:,} target tokens{counted})"
        ]
        if s.get("eval_records"):
            how = f"{s['eval_split']:.0%} split" if s.get("eval_split") else "held out"
            parts.append(f"eval: {s['eval_records']:,} records ({how}) -> {s['eval_rows']:,} rows")
        if s.get("skipped_bad"):
            n = s["skipped_bad"]
            parts.append(f"skipped {n:,} bad record{'s' if n != 1 else ''} ({', '.join(s['skipped_bad_lines'])})")
        for name in ("truncated", "dropped", "untrainable"):
            if s.get(name):
                parts.append(f"{s[name]:,} {name} ({', '.join(s[name + '_lines'])})")
        if s.get("chat_template") and s.get("format") != "text":  # which file, or which built-in
            parts.append(f"chat template: {s['chat_template']}")
            if s.get("chat_template_warning"):
                parts.append(f"warning: {s['chat_template_warning']}")
        if s.get("assistant_turns_without_eos"):
            parts.append(f"warning: {s['assistant_turns_without_eos']:,} assistant turns do not end with EOS")
        if s.get("cache") == "hit":
            parts.append(f"cache hit, mapped in {s['load_seconds']:.2f}s")
        else:
            cache = {"miss": " (cache miss, saved)", None: ""}.get(s.get("cache"), f" (cache {s.get('cache')})")
            parts.append(f"tokenized at {s['records_per_s']:,.0f} records/s{cache}")
        return "; ".join(parts)


def template_stats(tokenizer: Tokenizer) -> dict:
    """Where the chat template came from, and the warning for a model that has none."""
    return {"chat_template": tokenizer.template_source, "chat_template_warning": tokenizer.template_warning}


def _examples(examples: int | None, records: int) -> str:
    """", as 7 examples" where records gave more examples than themselves (turns in their own contexts)."""
    return f" as {examples:,} examples" if examples and examples != records else ""


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
    data_sha256 = sources.fingerprint(data)
    eval_sha256 = sources.fingerprint(eval_data) if eval_data else None
    key = cache_key(data_sha256, eval_sha256, tokenizer, options)
    cache = Cache(cache_dir, key) if cache_dir else None
    if cache is not None:
        hit = cache.load()
        if hit is not None:
            train, held_out, stats = hit
            stats.update(cache="hit", load_seconds=time.perf_counter() - started, data=str(data),
                         data_sha256=data_sha256, **template_stats(tokenizer))  # the same text may have moved
            return Prepared(train, held_out, stats)
    folder, cache_note = None, None
    if cache is not None:
        try:
            folder = cache.begin()
        except OSError as exc:
            cache_note = f"not written ({exc.strerror})"
    try:
        prepared = _prepare(tokenizer, data, eval_data, folder, options, started)
        prepared.stats.update(data_sha256=data_sha256, cache="miss" if folder else cache_note)
        if folder is not None:
            cache.commit(folder, prepared.train, prepared.eval, prepared.stats)
        return prepared
    except OSError as exc:
        raise SftplugError(f"{cache_dir}: cannot write the data cache ({exc.strerror or exc})") from None
    finally:
        if folder is not None and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)


def _prepare(tokenizer: Tokenizer, data, eval_data, folder: Path | None, options: dict, started: float) -> Prepared:
    """Tokenize, split and place; the tokens go to ``folder`` (or memory)."""
    seq_len, fmt, eval_split = options["seq_len"], options["fmt"], options["eval_split"]
    bad = BadLog(options["skip_bad_records"])
    store = _Store(folder, seq_len)
    formats, without_eos, counts = {}, 0, []

    def tokenize(path) -> int:
        """The source's records tokenized into the store; how many."""
        nonlocal without_eos
        before, records_before = bad.count, store.records
        problems = Problems()
        records = _records(path, problems, options["field_map"])
        file_fmt, missing = tokenize_source(path, records, problems, tokenizer, fmt, options["train_on_prompt"], bad,
                                            store.add, options["train_turns"])
        without_eos += missing
        formats[str(path)] = file_fmt or fmt
        n = store.records - records_before
        if not n:
            skipped = bad.count - before
            if skipped:
                raise SftplugError(f"{path}: no usable records: all {skipped:,} were bad (first: {bad.first[0]})")
            raise SftplugError(f"{path}: no records (the file is empty)")
        return n

    n_train = tokenize(data)
    n_eval = tokenize(eval_data) if eval_data else 0
    ids, trained, start, length, targets, lines, owners = store.close()
    is_eval = np.zeros(n_train + n_eval, dtype=bool)  # per record
    is_eval[n_train:] = True
    if eval_split:
        order, n_eval = _split_order(n_train, eval_split, options["seed"])
        if n_eval >= n_train:
            raise SftplugError(f"{data}: {n_train} records are too few for --eval-split {eval_split}")
        is_eval[order[:n_eval]] = True
    # Examples by their record's part: one conversation's examples are never split between train and eval.
    parts = {"train": np.flatnonzero(~is_eval[owners]),
             "eval": np.flatnonzero(is_eval[owners]) if eval_data or eval_split else None}
    layouts, counts = {}, {}
    for part, index in parts.items():
        if index is not None:
            source = str(eval_data if part == "eval" and eval_data else data)
            layouts[part], counts[part] = plan(start[index], length[index], targets[index], lines[index], source,
                                               seq_len, options["pack"], options["overlong"])
    if folder is not None:  # the rows map the files they will be read from
        for part, layout in layouts.items():
            for name, array in zip(LAYOUT, layout):
                np.save(folder / f"{part}.{name}.npy", array, allow_pickle=False)
        ids, trained = map_tokens(folder, store.tokens)
    rows = {part: PackedRows(ids, trained, *layout, seq_len, tokenizer.pad_id, counts[part]["target_tokens"])
            for part, layout in layouts.items()}
    train, held_out = counts["train"], counts.get("eval", {})
    seconds = time.perf_counter() - started
    n_records = len(is_eval)
    n_train_records = int((~is_eval).sum())
    stats = {
        "data": str(data),
        "eval_data": str(eval_data) if eval_data else None,
        "format": formats[str(data)],
        "formats": formats,
        **template_stats(tokenizer),
        "records": n_train_records,
        "eval_records": n_records - n_train_records,
        "examples": len(parts["train"]),
        "eval_examples": len(parts["eval"]) if parts["eval"] is not None else 0,
        "skipped_bad": bad.count,
        "skipped_bad_lines": bad.first,
        "rows": len(rows["train"]),
        "eval_rows": len(rows["eval"]) if "eval" in rows else 0,
        "tokens": train["tokens"],
        "target_tokens": train["target_tokens"],
        "eval_target_tokens": held_out.get("target_tokens", 0),
        "fill": train["tokens"] / (len(rows["train"]) * seq_len),
        "assistant_turns_without_eos": without_eos,
        "seconds": seconds,
        "records_per_s": n_records / max(seconds, 1e-9),
        **options,
    }
    for name in ("truncated", "dropped", "untrainable"):
        stats[name] = train[name] + held_out.get(name, 0)
        stats[name + "_lines"] = (train[name + "_lines"] + held_out.get(name + "_lines", []))[:SHOW_LINES]
    return Prepared(rows["train"], rows.get("eval"), stats)

