"""What training sees: the first records rendered token by token, the trained tokens marked.

The records go through training's own path (:func:`sftplug.data.tokenizing.tokenize_records`:
the chat template's trained spans, :meth:`Tokenizer.encode_masked`), so a marked token is
exactly one whose label the loss counts: a target the model learns to predict. A
document's first token is never a target (nothing predicts it), tokens past
``seq_len + 1`` are cut when ``overlong`` is "truncate", and a document dropped as
overlong has no targets at all.

Without colour, trained text is written between ``⟦`` and ``⟧`` (U+27E6, U+27E7): brackets
that training text hardly ever contains, unlike ``[[`` in code.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

from sftplug.data import sources
from sftplug.data.prepare import Prepared
from sftplug.data.records import BadLog
from sftplug.data.tokenizer import Tokenizer
from sftplug.data.tokenizing import tokenize_records

OPEN, CLOSE = "\u27e6", "\u27e7"


@dataclass
class Document:
    """One record as training sees it."""

    number: int  # the record's line (JSON) or row (tables)
    example: int  # which of the record's examples (1, 2, ...): one per turn where the template rewrites earlier turns
    examples: int  # how many examples the record gives
    ids: list[int]  # its tokens, as far as training reads them
    pieces: list[str]  # each token's text ("" for a token that only starts a character)
    marked: list[bool]  # per token: is it a target the loss counts
    cut: int  # tokens past seq_len + 1, truncated away
    dropped: bool  # longer than seq_len + 1 with overlong="drop": not trained


def preview_documents(tokenizer: Tokenizer, path, n: int, *, seq_len: int, fmt: str = "auto",
                      train_on_prompt: bool = False, train_turns: str = "all", overlong: str = "truncate",
                      skip_bad_records: bool = False, field_map: dict | None = None) -> list[Document]:
    """The examples of the first ``n`` records of ``path`` (bad ones skipped when ``skip_bad_records``), tokenized."""
    bad = BadLog(skip_bad_records)
    records = islice(sources.iter_records(path, bad, field_map), n)
    docs, _, _, owners = tokenize_records(path, records, tokenizer, fmt, train_on_prompt, bad, train_turns)
    owners = owners.tolist()
    starts = docs.starts.tolist()
    shown = []
    for k, (number, a, b) in enumerate(zip(docs.lines.tolist(), starts[:-1], starts[1:])):
        example, examples = owners[:k + 1].count(owners[k]), owners.count(owners[k])
        ids, trained = docs.ids[a:b].tolist(), docs.trained[a:b].tolist()
        over = len(ids) - (seq_len + 1)
        dropped = over > 0 and overlong == "drop"
        cut = over if over > 0 and not dropped else 0
        if cut:
            ids, trained = ids[: seq_len + 1], trained[: seq_len + 1]
        marked = [bool(t) and k > 0 and not dropped for k, t in enumerate(trained)]
        shown.append(Document(number, example, examples, ids, token_pieces(tokenizer, ids), marked, cut, dropped))
    return shown


def token_pieces(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Each token's text, decoded in sequence so characters split over tokens come out whole."""
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=False)
    return [stream.step(tokenizer.backend, i) or "" for i in ids]


def render(doc: Document, style=None) -> str:
    """The document's text with each run of trained tokens passed to ``style`` (default: ⟦ ⟧)."""
    style = style or (lambda text: OPEN + text + CLOSE)
    out, run = [], []
    for piece, marked in zip(doc.pieces, doc.marked):
        if marked:
            run.append(piece)
            continue
        if run:
            out.append(style("".join(run)))
            run = []
        out.append(piece)
    if run:
        out.append(style("".join(run)))
    return "".join(out)


def heading(doc: Document, path) -> str:
    trained = sum(doc.marked)
    what = f"{len(doc.pieces)} tokens, {trained} trained"
    if doc.examples > 1:
        what = f"example {doc.example} of {doc.examples}, " + what
    if doc.cut:
        what += f", {doc.cut} more cut by --seq-len"
    if doc.dropped:
        what += ", dropped: longer than --seq-len (--overlong drop)"
    return f"--- {path}:{doc.number} ({what})"


def stats_lines(prepared: Prepared) -> list[str]:
    """The dataset as training will see it, from prepare_data's stats."""
    s = prepared.stats
    tokens, targets = s.tokens, s.target_tokens
    lines = [
        f"records: {s.records:,} ({s.format})" + (
            f", {s.examples:,} examples (turns trained in their own contexts)" if s.examples != s.records else ""),
        f"tokens: {tokens:,} (input positions); trained: {targets:,} ({targets / max(tokens, 1):.1%})",
        f"rows: {s.rows:,} of {s.seq_len} ({'packed' if s.pack else 'one record per row'}, {s.fill:.1%} filled)",
        f"truncated: {s.truncated:,}; dropped: {s.dropped:,}; untrainable: {s.untrainable:,}; "
        f"bad records skipped: {s.skipped_bad:,}",
    ]
    if s.chat_template_warning and s.format != "text":
        lines.append(f"warning: {s.chat_template_warning}")
    if s.assistant_turns_without_eos:
        lines.append(f"warning: {s.assistant_turns_without_eos:,} assistant turns do not end with EOS "
                     "(generation may not learn to stop)")
    if s.eval_records:
        lines.append(f"eval: {s.eval_records:,} records -> {s.eval_rows:,} rows, "
                     f"{s.eval_target_tokens:,} trained tokens")
    return lines
