"""Records -> tokens and loss masks, ENCODE_CHUNK records at a time, in file order.

Each record is checked against its file's format (given, or detected from the first record
that has one) and rendered with the chat template; the trained character spans (assistant
turns) come from the rendering itself (:meth:`Tokenizer.render_spans`) and become token
masks through the tokenizer's offsets, with its batch API (:meth:`Tokenizer.encode_masked`).
A record gives one example (a tokenized document), or several where the template renders
earlier turns differently as the conversation grows; each example knows its record.
After the first INLINE_CHUNKS, on a machine of several cores, a pool of worker processes
renders and encodes the chunks; they are taken back in submission order, so the tokens and
the bad records reported are the same as in one process.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sftplug.data.chat_templates import ChatTemplateError
from sftplug.data.packing import Tokenized
from sftplug.data.records import BadLog, BadRecord, detect_format, format_problem, text_field, to_messages
from sftplug.data.tokenizer import Tokenizer
from sftplug.errors import SftplugError

ENCODE_CHUNK = 4096  # records per tokenizer batch call
INLINE_CHUNKS = 2  # chunks tokenized in this process before worker processes take over
# Worker processes for large sources; None: one per core. The Jinja rendering is Python on one
# core; tokenizers' own threads already encode a batch on all of them (BENCHMARKS.md compares).
TOKENIZE_WORKERS: int | None = None

class Problems:
    """Stands in for the BadLog while reading: keeps (line, problem) until its chunk's turn,
    so bad records are reported in file order whichever process tokenized them."""

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


def _chunks(records, problems: Problems, fmt: str):
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


def _encode(tokenizer: Tokenizer, train_on_prompt: bool, train_turns: str, fmt: str | None, lines: list,
            records: list):
    """One chunk's (ids, trained, lengths, lines, owners, problems, assistant turns without EOS).

    Per example: its tokens' length, its record's line, and ``owners``: which of the chunk's
    kept records (0, 1, ...) it comes from.
    """
    texts, spans, kept, owners, problems, without_eos = [], [], [], [], [], 0
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    for line, record in zip(lines, records):
        try:
            if fmt == "text":
                text = bos + text_field(record, "text") + eos
                examples = [(text, [(0, len(text))])]
            else:
                messages = to_messages(record, fmt, train_on_prompt)
                examples, missing = tokenizer.render_spans(messages, train_on_prompt, train_turns)
                without_eos += missing
        except (BadRecord, ChatTemplateError) as exc:
            problems.append((line, str(exc)))
            continue
        owner = owners[-1] + 1 if owners else 0
        for text, span in examples:
            texts.append(text)
            spans.append(span)
            kept.append(line)
            owners.append(owner)
    ids, trained, lengths = tokenizer.encode_masked(texts, spans)
    return (ids, trained, lengths, np.asarray(kept, dtype=np.int64), np.asarray(owners, dtype=np.int64), problems,
            without_eos)


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
    return TOKENIZE_WORKERS or cores


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


def _encoded(chunks, tokenizer: Tokenizer, train_on_prompt: bool, train_turns: str):
    """(chunk, _encode's result) in file order; after INLINE_CHUNKS, from a pool of workers if there are cores."""
    workers = _workers()
    for chunk in chunks if workers == 1 else itertools.islice(chunks, INLINE_CHUNKS):
        yield chunk, _encode(tokenizer, train_on_prompt, train_turns, chunk.fmt, chunk.lines, chunk.records)
    following = next(chunks, None)
    if following is None:  # a small source: no pool started
        return
    with _pool(tokenizer, workers) as pool:
        pending = []
        for chunk in itertools.chain([following], chunks):
            pending.append((chunk, pool.submit(_encode_in_worker, train_on_prompt, train_turns, chunk.fmt,
                                               chunk.lines, chunk.records)))
            if len(pending) > 2 * workers:  # bounded: a few chunks in flight, never the file
                done, future = pending.pop(0)
                yield done, future.result()
        for done, future in pending:
            yield done, future.result()


def tokenize_source(path, records, problems: Problems, tokenizer: Tokenizer, fmt: str, train_on_prompt: bool,
                    bad: BadLog, add, train_turns: str = "all") -> tuple[str | None, int]:
    """Every record of one source through ``add(ids, trained, lengths, lines, owners)``, a chunk at a time.

    Per example: lengths, its record's line, and owners: its record's index among the chunk's
    kept records (0, 1, ...). Returns the file's format and its assistant turns without EOS.
    """
    from tqdm import tqdm

    file_fmt, without_eos = (None if fmt == "auto" else fmt), 0
    # A bar on a terminal for sources that take a while; nothing otherwise.
    bar = tqdm(desc=f"tokenizing {Path(path).name}", unit=" records", unit_scale=True, leave=False, delay=2,
               disable=not sys.stderr.isatty())
    with bar:
        encoded = _encoded(_chunks(records, problems, fmt), tokenizer, train_on_prompt, train_turns)
        for chunk, (ids, trained, lengths, kept, owners, found, missing) in encoded:
            for line, problem in sorted(chunk.problems + found):
                bad(path, line, problem)
            if chunk.error is not None:
                raise chunk.error
            add(ids, trained, lengths, kept, owners)
            file_fmt, without_eos = chunk.fmt or file_fmt, without_eos + missing
            bar.update(len(chunk.records) + len(chunk.problems))
    return file_fmt, without_eos


def tokenize_records(path, records, tokenizer: Tokenizer, fmt: str, train_on_prompt: bool, bad: BadLog,
                     train_turns: str = "all"):
    """One source's examples held in memory (Tokenized), the file's format, assistant turns without EOS,
    and per example the index of its record among the kept ones (0, 1, ...)."""
    parts, lines, owners = [], [], []
    records_before = 0

    def add(ids, trained, lengths, kept, chunk_owners):
        nonlocal records_before
        parts.append((ids, trained, lengths))
        lines.append(kept)
        owners.append(chunk_owners + records_before)
        records_before += int(chunk_owners[-1]) + 1 if len(chunk_owners) else 0

    file_fmt, without_eos = tokenize_source(path, records, Problems(), tokenizer, fmt, train_on_prompt, bad, add,
                                            train_turns)
    docs = Tokenized.concat(parts, np.concatenate(lines) if lines else [], str(path))
    return docs, file_fmt, without_eos, np.concatenate(owners) if owners else np.zeros(0, np.int64)
