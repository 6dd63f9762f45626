"""Records -> chat template -> tokens and loss mask -> packed rows, cached on disk.

:func:`prepare_data` is the entry point the trainer calls. The steps:

1. Read a JSONL file or a JSON array (line numbers kept for every record). The record
   format is detected once per file (chat, prompt, alpaca, text) or given.
2. Check each record; a bad one is an error naming file, line and problem
   (:class:`SftplugError`, exit code 2), or is skipped and counted with
   ``skip_bad_records``.
3. Render messages with the chat template; the trained character spans (assistant turns)
   come from the rendering itself (:meth:`Tokenizer.render_spans`) and become token masks
   through the tokenizer's offsets, with its batch API (:meth:`Tokenizer.encode_masked`).
4. Pack: a document of n tokens becomes n-1 training positions (input token t, target
   token t+1, the target masked with -100 where it is not trained). Documents go into rows
   of ``seq_len`` positions by best-fit decreasing; positions restart at 0 in each
   document and ``doc_ids`` keep documents apart in attention. A document's last token is
   never an input, so no position is trained to predict the next document's first token.
5. Cache the rows (safetensors + a small JSON) under a hash of everything that decides
   them; a second run loads them at once.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sftplug.errors import SftplugError
from sftplug.tokenizer import ChatTemplateError, Tokenizer

IGNORE = -100
FORMATS = ("chat", "prompt", "alpaca", "text")
ROLES = ("system", "user", "assistant")
OVERLONG = ("truncate", "drop")
# Bump when tokens, masks or row layout produced from the same inputs change.
DATA_FORMAT_VERSION = 2
ENCODE_CHUNK = 4096  # records per tokenizer batch call
SHOW_LINES = 5
  # bad / truncated records named in the summary
_FORMAT_KEYS = {
    "chat": "a 'messages' list",
    "prompt": "'prompt' and 'completion' (or 'response')",
    "alpaca": "'instruction' and 'output'",
    "text": "a 'text' field",
}


class BadRecord(ValueError):
    """One record's problem, in words; the caller adds file and line."""


@dataclass
class Document:
    ids: list[int]
    trained: list[bool]  # per token: is it a target the loss counts


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

    @classmethod
    def from_documents(cls, documents: list[Document], source: str = "") -> "Tokenized":
        parts = [
            (np.asarray(d.ids, np.int32), np.asarray(d.trained, bool), np.array([len(d.ids)], np.int64))
            for d in documents
        ]
        return cls.concat(parts, np.arange(1, len(documents) + 1), source)

    def subset(self, index) -> "Tokenized":
        index = np.asarray(index, dtype=np.int64)
        lengths = (self.starts[1:] - self.starts[:-1])[index]
        starts = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        src = np.repeat(self.starts[:-1][index] - starts[:-1], lengths) + np.arange(starts[-1])
        return Tokenized(self.ids[src], self.trained[src], starts, self.lines[index], self.source)

    def documents(self) -> list[Document]:
        ids, trained, s = self.ids.tolist(), self.trained.tolist(), self.starts.tolist()
        return [Document(ids[a:b], trained[a:b]) for a, b in zip(s[:-1], s[1:])]


@dataclass
class Prepared:
    """What :func:`prepare_data` hands the trainer."""

    train: Rows
    eval: Rows | None
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
            parts.append(f"cache hit, loaded in {s['load_seconds']:.2f}s")
        else:
            cache = {"miss": " (cache miss, saved)", None: ""}.get(s.get("cache"), f" (cache {s.get('cache')})")
            parts.append(f"tokenised at {s['records_per_s']:,.0f} records/s{cache}")
        return "; ".join(parts)


# -- reading records ---------------------------------------------------------------
class _BadLog:
    """Bad records: raise the first (default) or skip and count them."""

    def __init__(self, skip: bool):
        self.skip, self.count, self.first = skip, 0, []

    def __call__(self, path, line, problem: str) -> None:
        where = f"{path}:{line}" if line else f"{path}"
        if not self.skip:
            raise SftplugError(f"{where}: {problem} (--skip-bad-records skips bad records)")
        self.count += 1
        if len(self.first) < SHOW_LINES:
            self.first.append(where)


def _read_bytes(path) -> bytes:
    path = Path(path)
    if str(path).endswith(".parquet"):
        raise SftplugError(f"{path}: parquet files need pyarrow, which sftplug does not use; convert to JSONL")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SftplugError(f"{path}: data file not found") from None
    except IsADirectoryError:
        raise SftplugError(f"{path}: is a folder; pass a JSONL or JSON file") from None
    except OSError as exc:
        raise SftplugError(f"{path}: cannot be read ({exc.strerror})") from None


_WS = re.compile(r"[ \t\n\r]*")


def _utf8_problem(raw: bytes, exc: UnicodeDecodeError) -> tuple[int, str]:
    line = raw.count(b"\n", 0, exc.start) + 1
    column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
    return line, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); re-encode the file as UTF-8"


def _iter_records(path, raw: bytes, bad: _BadLog):
    """(line, record) for every record of a JSONL file or JSON array held in ``raw``."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if raw.lstrip()[:1] == b"[":
            line, problem = _utf8_problem(raw, exc)
            raise SftplugError(f"{path}:{line}: {problem}") from None
        text = None  # JSONL: each line is decoded on its own, and a bad one reported
    if text is not None and text.lstrip()[:1] == "[":
        yield from _iter_json_array(path, text)
        return
    lines = text.split("\n") if text is not None else raw.split(b"\n")
    for lineno, line in enumerate(lines, start=1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad(path, lineno, _utf8_problem(line, exc)[1])
                continue
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            bad(path, lineno, f"invalid JSON ({exc.msg} at column {exc.colno})")


def _iter_json_array(path, text: str):
    decoder = json.JSONDecoder()
    pos = _WS.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    if text.startswith("]", pos):
        return
    while True:
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise SftplugError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        line += text.count("\n", counted, pos)
        counted = pos
        yield line, record
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            if text[pos + 1 :].strip():
                where = line + text.count("\n", counted, pos)
                raise SftplugError(f"{path}:{where}: invalid JSON (extra data after the closing ']')")
            return
        else:
            where = line + text.count("\n", counted, pos)
            raise SftplugError(f"{path}:{where}: invalid JSON (expected ',' or ']' between records)")


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs from a JSONL file or a JSON array; the first problem raises."""
    out = list(_iter_records(path, _read_bytes(path), _BadLog(skip=False)))
    if not out:
        raise SftplugError(f"{path}: no records (the file is empty)")
    return out


def first_record(path: str | Path) -> dict:
    """The first record of a data file, without parsing the rest."""
    found = next(_iter_records(path, _read_bytes(path), _BadLog(skip=False)), None)
    if found is None:
        raise SftplugError(f"{path}: no records (the file is empty)")
    return found[1]


def detect_format(record) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "prompt" in record and ("completion" in record or "response" in record):
        return "prompt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def _text_field(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"'{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise BadRecord(f"empty '{key}'")
    return value


def _messages(record: dict, fmt: str, train_on_prompt: bool = False) -> list[dict]:
    """A record of a message format as chat messages; BadRecord says what is wrong."""
    system = _text_field(record, "system", required=False) or None  # an empty system field is no system
    if system is not None and not system.strip():
        system = None
    if fmt == "chat":
        given = record["messages"]
        if not isinstance(given, list) or not given:
            raise BadRecord("'messages' must be a non-empty list")
        messages = []
        for k, m in enumerate(given, start=1):
            if not isinstance(m, dict):
                raise BadRecord(f"message {k} is not an object")
            role = m.get("role")
            if role not in ROLES:
                raise BadRecord(f"message {k} has role {role!r:.40}; expected one of {', '.join(ROLES)}")
            content = m.get("content")
            if not isinstance(content, str):
                raise BadRecord(f"message {k} ({role}) content must be a string, got {type(content).__name__}")
            if not content.strip():
                raise BadRecord(f"message {k} ({role}) has empty content")
            messages.append(m)
        if system is not None:
            if messages[0]["role"] == "system":
                raise BadRecord("both a 'system' field and a system message")
            messages.insert(0, {"role": "system", "content": system})
    else:
        if fmt == "prompt":
            prompt = _text_field(record, "prompt")
            completion = _text_field(record, "completion" if "completion" in record else "response")
        elif fmt == "alpaca":
            instruction, extra = _text_field(record, "instruction"), _text_field(record, "input", required=False)
            prompt = instruction + (f"\n\n{extra}" if extra.strip() else "")
            completion = _text_field(record, "output")
        else:
            raise BadRecord(f"unknown format {fmt}")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
    if not train_on_prompt and not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant message: nothing to train on")
    return messages


def to_messages(record: dict, fmt: str) -> list[dict]:
    """A record as chat messages; raises ValueError with the problem in words."""
    return _messages(record, fmt)


def _format_problem(record, fmt: str | None, fmt_from: str) -> str | None:
    """Why ``record`` is not of the file's format ``fmt`` (None: not known yet), or None."""
    if not isinstance(record, dict):
        return f"record is a JSON {type(record).__name__}, not an object"
    if fmt is not None and _has_keys(record, fmt):
        return None
    own = detect_format(record)
    if own is None:
        keys = ", ".join(f"'{k}'" for k in list(record)[:6]) or "none"
        expected = (
            f"this file holds {fmt} records, which need {_FORMAT_KEYS[fmt]} ({fmt_from})"
            if fmt
            else "expected messages, prompt+completion, instruction+output or text"
        )
        return f"record of no known format (keys: {keys}); {expected}"
    return f"a {own} record in a file of {fmt} records ({fmt_from})"


_HAS_KEYS = {
    "chat": lambda r: "messages" in r,
    "prompt": lambda r: "prompt" in r and ("completion" in r or "response" in r),
    "alpaca": lambda r: "instruction" in r and "output" in r,
    "text": lambda r: "text" in r,
}


def _has_keys(record: dict, fmt: str) -> bool:
    return _HAS_KEYS[fmt](record)


# -- tokenising --------------------------------------------------------------------
def _tokenize_records(path, records, tokenizer: Tokenizer, fmt: str, train_on_prompt: bool, bad: _BadLog):
    """Tokenized documents of one file, the file's format, and assistant turns without EOS."""
    parts, lines, texts, spans, without_eos = [], [], [], [], 0
    file_fmt, file_fmt_from = (None, "") if fmt == "auto" else (fmt, f"--format {fmt}")
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""

    def flush():
        if texts:
            parts.append(tokenizer.encode_masked(texts, spans))
            texts.clear()
            spans.clear()

    for line, record in records:
        if file_fmt is None:
            own = detect_format(record)
            if own is not None:
                file_fmt, file_fmt_from = own, f"detected from line {line}; --format overrides"
        problem = _format_problem(record, file_fmt, file_fmt_from)
        if problem:
            bad(path, line, problem)
            continue
        try:
            if file_fmt == "text":
                body = _text_field(record, "text")
                text = bos + body + eos
                span = [(0, len(text))]
            else:
                messages = _messages(record, file_fmt, train_on_prompt)
                text, span, missing = tokenizer.render_spans(messages, train_on_prompt)
                without_eos += missing
        except (BadRecord, ChatTemplateError) as exc:
            bad(path, line, str(exc))
            continue
        texts.append(text)
        spans.append(span)
        lines.append(line)
        if len(texts) >= ENCODE_CHUNK:
            flush()
    flush()
    return Tokenized.concat(parts, lines, str(path)), file_fmt, without_eos


def tokenize_file(path, tokenizer: Tokenizer, fmt: str = "auto", train_on_prompt: bool = False) -> list[Document]:
    """Every record of a data file as a tokenised document with its loss mask."""
    records = _iter_records(path, _read_bytes(path), _BadLog(skip=False))
    tokenized, _, _ = _tokenize_records(path, records, tokenizer, fmt, train_on_prompt, _BadLog(skip=False))
    if not len(tokenized):
        raise SftplugError(f"{path}: no records (the file is empty)")
    return tokenized.documents()


# -- packing -----------------------------------------------------------------------
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


def _pack(docs: Tokenized, seq_len: int, pad_id: int, packed: bool, overlong: str) -> tuple[Rows, dict]:
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


def pack(documents: list[Document], seq_len: int, pad_id: int, packed: bool = True) -> Rows:
    """Place documents into rows of seq_len positions (best-fit decreasing when packed)."""
    if not documents:
        raise SftplugError("no trainable examples: the dataset is empty")
    return _pack(Tokenized.from_documents(documents, "data"), seq_len, pad_id, packed, "truncate")[0]


def _split_order(n: int, fraction: float, seed: int) -> tuple[list[int], int]:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).tolist()
    return order, max(1, int(round(n * fraction)))


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
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> Prepared:
    """Training (and held-out) rows for a run, from the cache when nothing has changed.

    tokenizer: the model's Tokenizer (its chat template already chosen).
    data: training records, JSONL or a JSON array.
    eval_data: held-out records; or eval_split: the fraction of ``data`` held out (seeded).
    seq_len: positions per row; pack: several documents per row (best-fit decreasing).
    fmt: "auto" (detected per file) or one of FORMATS.
    train_on_prompt: train every token, not only assistant turns.
    overlong: "truncate" or "drop" documents longer than seq_len + 1 tokens.
    skip_bad_records: skip and count bad records instead of stopping at the first.
    cache_dir: where the tokenised rows are cached (None: no cache).
    seed: decides the eval split.
    """
    started = time.perf_counter()
    if fmt not in ("auto",) + FORMATS:
        raise SftplugError(f"--format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    if overlong not in OVERLONG:
        raise SftplugError(f"--overlong must be one of {', '.join(OVERLONG)}, got {overlong!r}")
    if seq_len < 1:
        raise SftplugError(f"--seq-len must be at least 1, got {seq_len}")
    if not 0 <= eval_split < 1:
        raise SftplugError(f"--eval-split must be a fraction in [0, 1), got {eval_split}")
    if eval_split and eval_data:
        raise SftplugError("use --eval-split or --eval-data, not both")
    raw = _read_bytes(data)
    eval_raw = _read_bytes(eval_data) if eval_data else None
    options = dict(
        seq_len=seq_len, pack=bool(pack), fmt=fmt, train_on_prompt=bool(train_on_prompt), overlong=overlong,
        eval_split=float(eval_split), seed=int(seed), skip_bad_records=bool(skip_bad_records),
    )  # fmt: skip
    data_sha256 = hashlib.sha256(raw).hexdigest()
    key = _cache_key(data_sha256, eval_raw, tokenizer, options)
    cache = _Cache(cache_dir, key) if cache_dir else None
    if cache is not None:
        hit = cache.load()
        if hit is not None:
            hit.stats.update(cache="hit", load_seconds=time.perf_counter() - started, data=str(data),
                             data_sha256=data_sha256)
            return hit

    bad = _BadLog(skip_bad_records)
    formats, without_eos = {}, 0

    def tokenize(path, content):
        nonlocal without_eos
        before = bad.count
        docs, file_fmt, missing = _tokenize_records(
            path, _iter_records(path, content, bad), tokenizer, fmt, train_on_prompt, bad
        )
        without_eos += missing
        formats[str(path)] = file_fmt or fmt
        if not len(docs):
            skipped = bad.count - before
            if skipped:
                raise SftplugError(f"{path}: no usable records: all {skipped:,} were bad (first: {bad.first[0]})")
            raise SftplugError(f"{path}: no records (the file is empty)")
        return docs

    train_docs = tokenize(data, raw)
    eval_docs = tokenize(eval_data, eval_raw) if eval_data else None
    if eval_split:
        order, n_eval = _split_order(len(train_docs), eval_split, seed)
        if n_eval >= len(train_docs):
            raise SftplugError(f"{data}: {len(train_docs)} records are too few for --eval-split {eval_split}")
        eval_docs = train_docs.subset(sorted(order[:n_eval]))
        train_docs = train_docs.subset(sorted(order[n_eval:]))
    train_rows, counts = _pack(train_docs, seq_len, tokenizer.pad_id, pack, overlong)
    eval_rows, eval_counts = (None, {})
    if eval_docs is not None:
        eval_rows, eval_counts = _pack(eval_docs, seq_len, tokenizer.pad_id, pack, overlong)
    seconds = time.perf_counter() - started
    n_records = len(train_docs) + (len(eval_docs) if eval_docs is not None else 0)
    stats = {
        "data": str(data),
        "eval_data": str(eval_data) if eval_data else None,
        "format": formats[str(data)],
        "formats": formats,
        "chat_template": tokenizer.template_source,
        "records": len(train_docs),
        "eval_records": len(eval_docs) if eval_docs is not None else 0,
        "skipped_bad": bad.count,
        "skipped_bad_lines": bad.first,
        "rows": len(train_rows),
        "eval_rows": len(eval_rows) if eval_rows is not None else 0,
        "tokens": counts["tokens"],
        "target_tokens": counts["target_tokens"],
        "eval_target_tokens": eval_counts.get("target_tokens", 0),
        "fill": counts["tokens"] / (len(train_rows) * seq_len),
        "assistant_turns_without_eos": without_eos,
        "seconds": seconds,
        "records_per_s": n_records / max(seconds, 1e-9),
        "cache": "miss" if cache is not None else None,
        **options,
    }
    for name in ("truncated", "dropped", "untrainable"):
        stats[name] = counts[name] + eval_counts.get(name, 0)
        stats[name + "_lines"] = (counts[name + "_lines"] + eval_counts.get(name + "_lines", []))[:SHOW_LINES]
    stats["data_sha256"] = data_sha256
    prepared = Prepared(train_rows, eval_rows, stats)
    if cache is not None:
        stats["cache_file"] = str(cache.tensors)
        cache.save(prepared)
    return prepared


# -- the cache ---------------------------------------------------------------------
def _cache_key(data_sha256: str, eval_raw: bytes | None, tokenizer: Tokenizer, options: dict) -> str:
    material = {
        "version": DATA_FORMAT_VERSION,
        "data": data_sha256,
        "eval_data": hashlib.sha256(eval_raw).hexdigest() if eval_raw is not None else None,
        "tokenizer": tokenizer.fingerprint(),
        **options,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


_ROW_FIELDS = ("input_ids", "labels", "positions", "doc_ids", "docs_per_row")


class _Cache:
    """Tokenised rows as safetensors plus a JSON of stats; never pickle."""

    def __init__(self, folder, key: str):
        self.folder, self.key = Path(folder), key
        self.tensors = self.folder / f"data-{key[:24]}.safetensors"
        self.meta = self.folder / f"data-{key[:24]}.json"

    def load(self) -> Prepared | None:
        from safetensors.torch import load_file

        if not (self.meta.is_file() and self.tensors.is_file()):
            return None
        try:
            meta = json.loads(self.meta.read_text())
            if meta.get("key") != self.key or meta.get("version") != DATA_FORMAT_VERSION:
                return None
            tensors = load_file(str(self.tensors))
            rows = {
                part: Rows(*(_widen(name, tensors[f"{part}.{name}"]) for name in _ROW_FIELDS))
                for part in ("train", "eval")
                if f"{part}.input_ids" in tensors
            }
        except Exception:  # a damaged cache is rebuilt, never trusted
            return None
        return Prepared(rows["train"], rows.get("eval"), meta["stats"])

    def save(self, prepared: Prepared) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for part, rows in (("train", prepared.train), ("eval", prepared.eval)):
            if rows is not None:
                for name in _ROW_FIELDS:
                    tensors[f"{part}.{name}"] = getattr(rows, name).to(torch.int32).contiguous()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            meta = {"key": self.key, "version": DATA_FORMAT_VERSION, "stats": prepared.stats}
            for path, write in (
                (self.tensors, lambda p: save_file(tensors, str(p), metadata={"key": self.key})),
                (self.meta, lambda p: p.write_text(json.dumps(meta, indent=1))),
            ):  # the JSON last: it marks a complete entry
                tmp = path.with_name(path.name + f".tmp{os.getpid()}")
                write(tmp)
                os.replace(tmp, path)
        except OSError as exc:
            prepared.stats["cache"] = f"not written ({exc.strerror})"


def _widen(name: str, t: torch.Tensor) -> torch.Tensor:
    return t if name == "doc_ids" else t.to(torch.long)


# -- batches -----------------------------------------------------------------------
class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch ``m`` of a run as a pure function of ``m``: rows in a seeded order per epoch.

    Being a pure function makes the data position one integer (exact resume) and lets
    DataLoader workers prefetch without owning any state.
    """

    def __init__(self, rows: Rows, micro_bsz: int, seed: int, trim: bool = False, rank: int = 0, world: int = 1):
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
        batch = batch_of(self.rows, self.picks(m))
        if self.trim and batch["doc_ids"] is None:
            # one document per row: cut the columns that are padding in every row
            longest = int((self.rows.doc_ids[self.picks(m)] == 0).sum(1).max())
            batch = {k: v[:, :longest] if v is not None else None for k, v in batch.items()}
        return batch


class _CountFrom(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


class Batches:
    """The run's stream of micro-batches; ``workers`` > 0 prefetches them in DataLoader workers."""

    def __init__(self, rows: Rows, micro_bsz: int, seed: int, workers: int = 0, pin_memory: bool = False,
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


def batch_of(rows: Rows, picked) -> dict[str, torch.Tensor]:
    # Rows of one document and trailing padding need plain causal attention only.
    single = int(rows.docs_per_row[picked].max()) <= 1
    return {
        "input_ids": rows.input_ids[picked],
        "labels": rows.labels[picked],
        "positions": rows.positions[picked],
        "doc_ids": None if single else rows.doc_ids[picked],
    }
