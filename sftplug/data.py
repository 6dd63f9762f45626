"""Records -> chat template -> tokens and loss mask -> packed rows.

A document of n tokens becomes n-1 training positions: input token t, target token t+1,
the target masked (-100) where the template did not mark it as trained. Packed rows hold
several documents; positions restart at each one and ``doc_ids`` keep them apart, so no
position is ever trained to predict the next document's first token.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sftplug.errors import SftplugError
from sftplug.tokenizer import Tokenizer

IGNORE = -100
FORMATS = ("chat", "prompt", "alpaca", "text")
ROLES = ("system", "user", "assistant")


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


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs from a JSONL file or a JSON array."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SftplugError(f"{path}: data file not found") from None
    except UnicodeDecodeError as exc:
        raise SftplugError(f"{path}: not UTF-8 (byte {exc.start}); re-encode the file as UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SftplugError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        return [(i + 1, r) for i, r in enumerate(records)]
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise SftplugError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
    if not out:
        raise SftplugError(f"{path}: the data file holds no records")
    return out


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


def to_messages(record: dict, fmt: str) -> list[dict]:
    """A record as chat messages; raises ValueError with the problem in words."""
    if fmt == "chat":
        messages = list(record["messages"])
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": record["system"]})
    elif fmt == "prompt":
        completion = record.get("completion", record.get("response"))
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": completion}]
    elif fmt == "alpaca":
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    else:
        raise ValueError(f"unknown format {fmt}")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"message role must be one of {', '.join(ROLES)}, got {m!r:.60}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise ValueError(f"empty or non-text content in a {m['role']} message")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to train on")
    return messages


def tokenize_file(path, tokenizer: Tokenizer, fmt: str = "auto", train_on_prompt: bool = False) -> list[Document]:
    """Every record of a data file as a tokenised document with its loss mask."""
    texts, spans = [], []
    for lineno, record in read_records(path):
        record_fmt = detect_format(record) if fmt == "auto" else fmt
        if record_fmt is None:
            raise SftplugError(
                f"{path}:{lineno}: record of no known format; expected messages, prompt+completion, "
                "instruction+output or text"
            )
        try:
            if record_fmt == "text":
                if not isinstance(record.get("text"), str) or not record["text"].strip():
                    raise ValueError("empty or non-text 'text' field")
                bos = tokenizer.bos_token or ""
                eos = tokenizer.eos_token or ""
                segments = [(bos, train_on_prompt), (record["text"] + eos, True)]
            else:
                rendered = tokenizer.render_segments(to_messages(record, record_fmt), train_on_prompt)
                segments = [(s.text, s.trained) for s in rendered]
        except (KeyError, ValueError, TypeError) as exc:
            raise SftplugError(f"{path}:{lineno}: {exc}") from None
        text, trained_spans, offset = "", [], 0
        for seg_text, trained in segments:
            if trained:
                trained_spans.append((offset, offset + len(seg_text)))
            text += seg_text
            offset += len(seg_text)
        texts.append(text)
        spans.append(trained_spans)
    documents = []
    for encoding, trained_spans in zip(tokenizer.encode_batch(texts), spans):
        trained = [any(a <= start < b for a, b in trained_spans) for start, _ in encoding.offsets]
        documents.append(Document(list(encoding.ids), trained))
    return documents


def pack(documents: list[Document], seq_len: int, pad_id: int, packed: bool = True) -> Rows:
    """Place documents into rows of seq_len positions (best-fit decreasing when packed)."""
    examples = [d for d in documents if len(d.ids) >= 2 and any(d.trained[1:])]
    if not examples:
        raise SftplugError("no trainable examples: every record is empty or fully masked")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
    rows: list[list[int]] = []  # document indices per row
    open_rows: list[tuple[int, int]] = []  # (free positions, row), sorted: best fit = first that fits
    for i in order:
        need = min(len(examples[i].ids) - 1, seq_len)
        slot = bisect.bisect_left(open_rows, (need, -1)) if packed else len(open_rows)
        if slot < len(open_rows):
            free, r = open_rows.pop(slot)
        else:
            free, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if packed and free - need > 0:
            bisect.insort(open_rows, (free - need, r))
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    positions = torch.zeros((n, seq_len), dtype=torch.long)
    doc_ids = torch.zeros((n, seq_len), dtype=torch.int32)
    for r, members in enumerate(rows):
        t = 0
        for doc_index, i in enumerate(members):
            ids, trained = examples[i].ids[: seq_len + 1], examples[i].trained[: seq_len + 1]
            m = len(ids) - 1
            input_ids[r, t : t + m] = torch.tensor(ids[:-1])
            targets = [tok if keep else IGNORE for tok, keep in zip(ids[1:], trained[1:])]
            labels[r, t : t + m] = torch.tensor(targets)
            positions[r, t : t + m] = torch.arange(m)
            doc_ids[r, t : t + m] = doc_index
            t += m
        doc_ids[r, t:] = len(members)  # padding is a document of its own: nobody attends to it
        positions[r, t:] = torch.arange(seq_len - t)
    docs_per_row = torch.tensor([len(m) for m in rows])
    return Rows(input_ids, labels, positions, doc_ids, docs_per_row)


def split_eval(documents: list[Document], fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(documents), generator=generator).tolist()
    n_eval = max(1, int(round(len(documents) * fraction)))
    return [documents[i] for i in order[n_eval:]], [documents[i] for i in order[:n_eval]]


class Batches:
    """Micro-batches of rows in a seeded order per epoch; its position is resumable."""

    def __init__(self, rows: Rows, micro_bsz: int, seed: int):
        self.rows, self.micro_bsz, self.seed = rows, micro_bsz, seed
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(len(self.rows), generator=generator).tolist()

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order()

    def next(self) -> dict[str, torch.Tensor]:
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order()
        picked = [self._order[(self.index + j) % len(self._order)] for j in range(self.micro_bsz)]
        self.index += self.micro_bsz
        return batch_of(self.rows, picked)


def batch_of(rows: Rows, picked) -> dict[str, torch.Tensor]:
    # Rows of one document and trailing padding need plain causal attention only.
    single = int(rows.docs_per_row[picked].max()) <= 1
    return {
        "input_ids": rows.input_ids[picked],
        "labels": rows.labels[picked],
        "positions": rows.positions[picked],
        "doc_ids": None if single else rows.doc_ids[picked],
    }
