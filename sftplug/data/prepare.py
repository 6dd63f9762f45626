"""Records -> chat template -> tokens and loss mask -> packed rows, cached on disk.

:func:`prepare_data` is the entry point the trainer calls. The steps:

1. Read a JSONL file or a JSON array (line numbers kept for every record). The record
   format is detected once per file (chat, prompt, alpaca, text) or given
   (:mod:`sftplug.data.records`).
2. Check each record; a bad one is an error naming file, line and problem
   (:class:`SftplugError`, exit code 2), or is skipped and counted with
   ``skip_bad_records``.
3. Render messages with the chat template; the trained character spans (assistant turns)
   come from the rendering itself (:meth:`Tokenizer.render_spans`) and become token masks
   through the tokenizer's offsets, with its batch API (:meth:`Tokenizer.encode_masked`).
4. Pack documents into rows of ``seq_len`` positions by best-fit decreasing, positions
   restarting in each document (:mod:`sftplug.data.packing`).
5. Cache the rows (safetensors + a small JSON) under a hash of everything that decides
   them; a second run loads them at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sftplug.data.packing import Rows, Tokenized, pack_tokenized
from sftplug.data.records import (
    SHOW_LINES,
    BadLog,
    BadRecord,
    detect_format,
    format_problem,
    iter_records,
    read_bytes,
    text_field,
    to_messages,
)
from sftplug.data.tokenizer import ChatTemplateError, Tokenizer
from sftplug.errors import SftplugError

# Bump when tokens, masks or row layout produced from the same inputs change.
DATA_FORMAT_VERSION = 2
ENCODE_CHUNK = 4096  # records per tokenizer batch call


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


# -- tokenising --------------------------------------------------------------------
def tokenize_records(path, records, tokenizer: Tokenizer, fmt: str, train_on_prompt: bool, bad: BadLog):
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
        problem = format_problem(record, file_fmt, file_fmt_from)
        if problem:
            bad(path, line, problem)
            continue
        try:
            if file_fmt == "text":
                body = text_field(record, "text")
                text = bos + body + eos
                span = [(0, len(text))]
            else:
                messages = to_messages(record, file_fmt, train_on_prompt)
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

    The options are TrainConfig's, already checked there.

    tokenizer: the model's Tokenizer (its chat template already chosen).
    data: training records, JSONL or a JSON array.
    eval_data: held-out records; or eval_split: the fraction of ``data`` held out (seeded).
    seq_len: positions per row; pack: several documents per row (best-fit decreasing).
    fmt: "auto" (detected per file) or one of records.FORMATS.
    train_on_prompt: train every token, not only assistant turns.
    overlong: "truncate" or "drop" documents longer than seq_len + 1 tokens.
    skip_bad_records: skip and count bad records instead of stopping at the first.
    cache_dir: where the tokenised rows are cached (None: no cache).
    seed: decides the eval split.
    """
    started = time.perf_counter()
    raw = read_bytes(data)
    eval_raw = read_bytes(eval_data) if eval_data else None
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

    bad = BadLog(skip_bad_records)
    formats, without_eos = {}, 0

    def tokenize(path, content):
        nonlocal without_eos
        before = bad.count
        docs, file_fmt, missing = tokenize_records(
            path, iter_records(path, content, bad), tokenizer, fmt, train_on_prompt, bad
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
    train_rows, counts = pack_tokenized(train_docs, seq_len, tokenizer.pad_id, pack, overlong)
    eval_rows, eval_counts = (None, {})
    if eval_docs is not None:
        eval_rows, eval_counts = pack_tokenized(eval_docs, seq_len, tokenizer.pad_id, pack, overlong)
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
