"""Records -> chat template -> tokens and loss mask -> packed rows, cached on disk and memory-mapped.

:func:`prepare_data` is the entry point the trainer calls. The steps:

1. Read the records of a data source, streamed (:mod:`sftplug.data.sources`: JSONL, JSON,
   gzip, parquet, a ``datasets`` folder; line or row numbers kept), ``field_map`` renaming
   fields. The record format is detected once per file or given (:mod:`sftplug.data.records`).
2. Check each record; a bad one is an error naming file, line and problem
   (:class:`SftplugError`, exit code 2), or is skipped and counted with
   ``skip_bad_records``.
3. Render messages with the chat template; the trained character spans (assistant turns)
   come from the rendering itself (:meth:`Tokenizer.render_spans`) and become token masks
   through the tokenizer's offsets, with its batch API (:meth:`Tokenizer.encode_masked`).
   Records go ENCODE_CHUNK at a time; after the first INLINE_CHUNKS, a pool of worker
   processes (one per core) renders and encodes the chunks, taken back in order, so the
   result is the same as in one process.
4. Each chunk's tokens are appended to the cache entry's files as they come (ids int32,
   trained flags bool: 5 bytes per token on disk); memory holds a few chunks and, per
   document, its start, length, targets and line.
5. Place documents into rows of ``seq_len`` positions by best-fit decreasing
   (:mod:`sftplug.data.packing`); the rows themselves are built per micro-batch.
6. The entry (token files, placements as .npy, a small JSON written last) sits under a
   hash of everything that decides it; every run, the first included, memory-maps it.
   Without a cache folder (tests, ``data preview``) the tokens are kept in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sftplug.data import sources
from sftplug.data.packing import PackedRows, Tokenized, doc_targets, plan
from sftplug.data.records import SHOW_LINES, BadLog, BadRecord, detect_format, format_problem, text_field, to_messages
from sftplug.data.tokenizer import ChatTemplateError, Tokenizer
from sftplug.errors import SftplugError

# Bump when tokens, masks, row layout or the cache's files produced from the same inputs change.
DATA_FORMAT_VERSION = 3
ENCODE_CHUNK = 4096  # records per tokenizer batch call
INLINE_CHUNKS = 2  # chunks tokenised in this process before worker processes take over
TOKENIZE_WORKERS: int | None = None  # worker processes for large sources; None: one per core from POOL_MIN_CORES
# On 2 cores a pool measured slower than one process (benchmarks/tokenize_speed.py): tokenizers already
# encodes a chunk on both cores, and handing records to workers costs ~20% more CPU in all.
POOL_MIN_CORES = 4


@dataclass
class Prepared:
    """What :func:`prepare_data` hands the trainer."""

    train: PackedRows
    eval: PackedRows | None
    stats: dict = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the run header."""
        s = self.stats
        parts = [
            f"data: {s['records']:,} {s['format']} records -> {s['rows']:,} rows of "
            f"{s['seq_len']} ({'packed' if s['pack'] else 'one per row'}, {s['fill']:.0%} filled, "
            f"{s['target_tokens']:,} target tokens)"
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
        if s.get("chat_template") not in (None, "tokenizer_config.json") and s.get("format") != "text":
            parts.append(f"chat template: {s['chat_template']}")
        if s.get("assistant_turns_without_eos"):
            parts.append(f"warning: {s['assistant_turns_without_eos']:,} assistant turns do not end with EOS")
        if s.get("cache") == "hit":
            parts.append(f"cache hit, mapped in {s['load_seconds']:.2f}s")
        else:
            cache = {"miss": " (cache miss, saved)", None: ""}.get(s.get("cache"), f" (cache {s.get('cache')})")
            parts.append(f"tokenised at {s['records_per_s']:,.0f} records/s{cache}")
        return "; ".join(parts)


# -- reading and checking records ----------------------------------------------------
def _records(path, bad, field_map):
    """(line, record) of a data source: the one place records come from."""
    return sources.iter_records(path, bad, field_map)


class _Problems:
    """Stands in for the BadLog while reading: keeps (line, problem) until its chunk's turn,
    so bad records are reported in file order whichever process tokenised them."""

    def __init__(self):
        self.found: list[tuple[int, str]] = []

    def __call__(self, path, line, problem: str) -> None:
        self.found.append((line, problem))

    def take(self) -> list[tuple[int, str]]:
        found, self.found = self.found, []
        return found


@dataclass
class _Chunk:
    fmt: str | None  # the file's format, as known once this chunk was read
    lines: list = field(default_factory=list)
    records: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # found while reading and checking formats
    error: SftplugError | None = None  # the source failed after this chunk's records


def _chunks(records, problems: _Problems, fmt: str):
    """Records of the file's format (detected from the first record that has one) in chunks of ENCODE_CHUNK."""
    file_fmt, fmt_from = (None, "") if fmt == "auto" else (fmt, f"--format {fmt}")
    chunk = _Chunk(file_fmt)
    try:
        for line, record in records:
            if file_fmt is None:
                own = detect_format(record)
                if own is not None:
                    file_fmt, fmt_from = own, f"detected from line {line}; --format overrides"
            problem = format_problem(record, file_fmt, fmt_from)
            if problem:
                problems(None, line, problem)
                continue
            chunk.fmt = file_fmt
            chunk.lines.append(line)
            chunk.records.append(record)
            if len(chunk.records) >= ENCODE_CHUNK:
                chunk.problems = problems.take()
                yield chunk
                chunk = _Chunk(file_fmt)
    except SftplugError as exc:
        chunk.error = exc
    chunk.problems = problems.take()
    yield chunk


# -- tokenising ------------------------------------------------------------------------
def _encode(tokenizer: Tokenizer, train_on_prompt: bool, fmt: str | None, lines: list, records: list):
    """One chunk's (ids, trained, lengths, lines kept, problems, assistant turns without EOS)."""
    texts, spans, kept, problems, without_eos = [], [], [], [], 0
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    for line, record in zip(lines, records):
        try:
            if fmt == "text":
                text = bos + text_field(record, "text") + eos
                span = [(0, len(text))]
            else:
                text, span, missing = tokenizer.render_spans(to_messages(record, fmt, train_on_prompt),
                                                             train_on_prompt)
                without_eos += missing
        except (BadRecord, ChatTemplateError) as exc:
            problems.append((line, str(exc)))
            continue
        texts.append(text)
        spans.append(span)
        kept.append(line)
    ids, trained, lengths = tokenizer.encode_masked(texts, spans)
    return ids, trained, lengths, np.asarray(kept, dtype=np.int64), problems, without_eos


_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(*args):
    return _encode(_worker_tokenizer, *args)


def _workers() -> int:
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1  # workers inherit the tokenizer by fork
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return TOKENIZE_WORKERS or (cores if cores >= POOL_MIN_CORES else 1)


@contextlib.contextmanager
def _pool(tokenizer: Tokenizer, workers: int):
    # Each worker encodes on one thread. The variable is set while the workers fork: tokenizers
    # then neither warns about the fork nor starts a thread pool in each of them.
    unset = "TOKENIZERS_PARALLELISM" not in os.environ
    if unset:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("fork"), _start_worker, (tokenizer,))
    try:
        pool.submit(int).result()  # the workers fork now
    finally:
        if unset:
            del os.environ["TOKENIZERS_PARALLELISM"]
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def _encoded(chunks, tokenizer: Tokenizer, train_on_prompt: bool):
    """(chunk, _encode's result) in file order; after INLINE_CHUNKS, from a pool of workers if there are cores."""
    workers = _workers()
    for chunk in chunks if workers == 1 else itertools.islice(chunks, INLINE_CHUNKS):
        yield chunk, _encode(tokenizer, train_on_prompt, chunk.fmt, chunk.lines, chunk.records)
    following = next(chunks, None)
    if following is None:  # a small source: no pool started
        return
    with _pool(tokenizer, workers) as pool:
        pending = []
        for chunk in itertools.chain([following], chunks):
            pending.append((chunk, pool.submit(_encode_in_worker, train_on_prompt, chunk.fmt, chunk.lines,
                                               chunk.records)))
            if len(pending) > 2 * workers:  # bounded: a few chunks in flight, never the file
                done, future = pending.pop(0)
                yield done, future.result()
        for done, future in pending:
            yield done, future.result()


def _tokenize(path, records, problems: _Problems, tokenizer: Tokenizer, fmt: str, train_on_prompt: bool,
              bad: BadLog, add) -> tuple[str | None, int]:
    """Every record of one source through ``add(ids, trained, lengths, lines)``, a chunk at a time.

    Returns the file's format and its assistant turns without EOS.
    """
    from tqdm import tqdm

    file_fmt, without_eos = (None if fmt == "auto" else fmt), 0
    # A bar on a terminal for sources that take a while; nothing otherwise.
    bar = tqdm(desc=f"tokenising {Path(path).name}", unit=" records", unit_scale=True, leave=False, delay=2,
               disable=not sys.stderr.isatty())
    with bar:
        for chunk, (ids, trained, lengths, kept, found, missing) in _encoded(_chunks(records, problems, fmt),
                                                                             tokenizer, train_on_prompt):
            for line, problem in sorted(chunk.problems + found):
                bad(path, line, problem)
            if chunk.error is not None:
                raise chunk.error
            add(ids, trained, lengths, kept)
            file_fmt, without_eos = chunk.fmt or file_fmt, without_eos + missing
            bar.update(len(chunk.records) + len(chunk.problems))
    return file_fmt, without_eos


def tokenize_records(path, records, tokenizer: Tokenizer, fmt: str, train_on_prompt: bool, bad: BadLog):
    """Tokenized documents of one source, held in memory; the file's format; assistant turns without EOS."""
    parts, lines = [], []

    def add(ids, trained, lengths, kept):
        parts.append((ids, trained, lengths))
        lines.append(kept)

    file_fmt, without_eos = _tokenize(path, records, _Problems(), tokenizer, fmt, train_on_prompt, bad, add)
    return Tokenized.concat(parts, np.concatenate(lines) if lines else [], str(path)), file_fmt, without_eos


class _Store:
    """Tokens appended chunk by chunk, to files in a folder or (no folder) to memory; per-document arrays."""

    def __init__(self, folder: Path | None, seq_len: int):
        self.seq_len, self.tokens, self.documents = seq_len, 0, 0
        self.files = [open(folder / name, "wb") for name in ("ids.bin", "trained.bin")] if folder else None
        self.in_memory: list[tuple[np.ndarray, np.ndarray]] = []
        self.lengths, self.targets, self.lines = [], [], []

    def add(self, ids, trained, lengths, lines) -> None:
        if self.files:
            ids.tofile(self.files[0])
            trained.tofile(self.files[1])
        else:
            self.in_memory.append((ids, trained))
        self.lengths.append(lengths)
        self.targets.append(doc_targets(trained, lengths, self.seq_len))
        self.lines.append(lines)
        self.tokens += len(ids)
        self.documents += len(lengths)

    def close(self) -> tuple[np.ndarray, ...]:
        """The token arrays if held in memory (else None, None), and per document: start, length, targets, line."""
        for f in self.files or ():
            f.close()
        tokens = [np.concatenate(a) for a in zip(*self.in_memory)] if self.in_memory else [None, None]
        length, targets, lines = (np.concatenate(a) for a in (self.lengths, self.targets, self.lines))
        self.lengths, self.targets, self.lines, self.in_memory = [], [], [], []
        return *tokens, np.cumsum(length) - length, length, targets, lines


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
    overlong: "truncate" or "drop" documents longer than seq_len + 1 tokens.
    skip_bad_records: skip and count bad records instead of stopping at the first.
    field_map: record fields renamed before anything else reads them ({"question": "prompt"}).
    cache_dir: where the tokenised data is cached (None: no cache, the tokens kept in memory).
    seed: decides the eval split.
    """
    started = time.perf_counter()
    options = dict(
        seq_len=seq_len, pack=bool(pack), fmt=fmt, train_on_prompt=bool(train_on_prompt), overlong=overlong,
        eval_split=float(eval_split), seed=int(seed), skip_bad_records=bool(skip_bad_records),
        field_map=dict(field_map) if field_map else None,
    )  # fmt: skip
    data_sha256 = sources.fingerprint(data)
    eval_sha256 = sources.fingerprint(eval_data) if eval_data else None
    key = _cache_key(data_sha256, eval_sha256, tokenizer, options)
    cache = _Cache(cache_dir, key) if cache_dir else None
    if cache is not None:
        hit = cache.load()
        if hit is not None:
            hit.stats.update(cache="hit", load_seconds=time.perf_counter() - started, data=str(data),
                             data_sha256=data_sha256)
            return hit
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
            cache.commit(folder, prepared)
        return prepared
    except OSError as exc:
        raise SftplugError(f"{cache_dir}: cannot write the data cache ({exc.strerror or exc})") from None
    finally:
        if folder is not None and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)


def _prepare(tokenizer: Tokenizer, data, eval_data, folder: Path | None, options: dict, started: float) -> Prepared:
    """Tokenise, split and place; the tokens go to ``folder`` (or memory)."""
    seq_len, fmt, eval_split = options["seq_len"], options["fmt"], options["eval_split"]
    bad = BadLog(options["skip_bad_records"])
    store = _Store(folder, seq_len)
    formats, without_eos, counts = {}, 0, []

    def tokenize(path) -> int:
        nonlocal without_eos
        before, docs_before = bad.count, store.documents
        problems = _Problems()
        records = _records(path, problems, options["field_map"])
        file_fmt, missing = _tokenize(path, records, problems, tokenizer, fmt, options["train_on_prompt"], bad,
                                      store.add)
        without_eos += missing
        formats[str(path)] = file_fmt or fmt
        n = store.documents - docs_before
        if not n:
            skipped = bad.count - before
            if skipped:
                raise SftplugError(f"{path}: no usable records: all {skipped:,} were bad (first: {bad.first[0]})")
            raise SftplugError(f"{path}: no records (the file is empty)")
        return n

    n_train = tokenize(data)
    n_eval = tokenize(eval_data) if eval_data else 0
    ids, trained, start, length, targets, lines = store.close()
    parts = {"train": np.arange(n_train), "eval": np.arange(n_train, n_train + n_eval) if eval_data else None}
    if eval_split:
        order, n_eval = _split_order(n_train, eval_split, options["seed"])
        if n_eval >= n_train:
            raise SftplugError(f"{data}: {n_train} records are too few for --eval-split {eval_split}")
        parts = {"train": np.sort(order[n_eval:]), "eval": np.sort(order[:n_eval])}
    layouts, counts = {}, {}
    for part, index in parts.items():
        if index is not None:
            source = str(eval_data if part == "eval" and eval_data else data)
            layouts[part], counts[part] = plan(start[index], length[index], targets[index], lines[index], source,
                                               seq_len, options["pack"], options["overlong"])
    if folder is not None:  # the rows map the files they will be read from
        for part, layout in layouts.items():
            for name, array in zip(_LAYOUT, layout):
                np.save(folder / f"{part}.{name}.npy", array, allow_pickle=False)
        ids, trained = _map_tokens(folder, store.tokens)
    rows = {part: PackedRows(ids, trained, *layout, seq_len, tokenizer.pad_id, counts[part]["target_tokens"])
            for part, layout in layouts.items()}
    train, held_out = counts["train"], counts.get("eval", {})
    seconds = time.perf_counter() - started
    n_records = len(parts["train"]) + (len(parts["eval"]) if parts["eval"] is not None else 0)
    stats = {
        "data": str(data),
        "eval_data": str(eval_data) if eval_data else None,
        "format": formats[str(data)],
        "formats": formats,
        "chat_template": tokenizer.template_source,
        "records": len(parts["train"]),
        "eval_records": n_records - len(parts["train"]),
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


# -- the cache ---------------------------------------------------------------------
def _cache_key(data_sha256: str, eval_sha256: str | None, tokenizer: Tokenizer, options: dict) -> str:
    material = {
        "version": DATA_FORMAT_VERSION,
        "data": data_sha256,
        "eval_data": eval_sha256,
        "tokenizer": tokenizer.fingerprint(),
        **options,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


_LAYOUT = ("doc_start", "need", "row_ptr")  # PackedRows' placement arrays, one .npy each


def _map_tokens(folder: Path, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.memmap(folder / "ids.bin", dtype=np.int32, mode="r")
    trained = np.memmap(folder / "trained.bin", dtype=np.bool_, mode="r")
    if len(ids) != tokens or len(trained) != tokens:
        raise ValueError("token files of the wrong size")
    return ids, trained


class _Cache:
    """One folder per entry: token files (raw int32 / bool), placements (.npy), meta.json; never pickle.

    An entry is written under a temporary name, meta.json last, then renamed into place;
    an entry that is partial, damaged or of another version is rebuilt, never trusted.
    """

    def __init__(self, folder, key: str):
        self.folder, self.key = Path(folder), key
        self.entry = self.folder / f"data-{key[:24]}"

    def load(self) -> Prepared | None:
        try:
            meta = json.loads((self.entry / "meta.json").read_text())
            if meta.get("key") != self.key or meta.get("version") != DATA_FORMAT_VERSION:
                return None
            tokens = _map_tokens(self.entry, meta["tokens"])
            rows = {}
            for part, target in meta["target_tokens"].items():
                layout = [np.load(self.entry / f"{part}.{name}.npy", mmap_mode="r", allow_pickle=False)
                          for name in _LAYOUT]
                if not len(layout[0]) == len(layout[1]) == layout[2][-1]:
                    return None
                rows[part] = PackedRows(*tokens, *layout, meta["seq_len"], meta["pad_id"], target)
            return Prepared(rows["train"], rows.get("eval"), meta["stats"])
        except Exception:  # a damaged cache is rebuilt, never trusted
            return None

    def begin(self) -> Path:
        """A new, empty folder to write the entry into."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{self.entry.name}.tmp", dir=self.folder))

    def commit(self, folder: Path, prepared: Prepared) -> None:
        """The entry written in ``folder``, meta.json added last, put in place (its rows map it already)."""
        prepared.stats["cache_file"] = str(self.entry)
        rows = {"train": prepared.train, "eval": prepared.eval}
        meta = {
            "key": self.key, "version": DATA_FORMAT_VERSION, "tokens": len(prepared.train.ids),
            "seq_len": prepared.train.seq_len, "pad_id": prepared.train.pad_id,
            "target_tokens": {part: r.target_tokens for part, r in rows.items() if r is not None},
            "stats": prepared.stats,
        }  # fmt: skip
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(self.entry, ignore_errors=True)  # a damaged or older entry of the same key
        os.replace(folder, self.entry)
