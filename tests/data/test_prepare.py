"""The data path: formats, loss masks, packing, model-level packing checks, bad records, cache.

Masks are checked token by token against hand-worked examples with the bundled tokenizer
(sftplug/assets): its template renders ``<|bos|>`` then, per message,
``<|role|>\\n`` + content (+ ``<|eos|>`` for the assistant) + ``\\n``. In the expected
strings below tokens are separated by spaces and the trained ones are in [brackets].
"""

import json
import random
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sftplug.plugins.sdpa as sdpa
from sftplug.config import ASSETS
from sftplug.data import packing as data_packing
from sftplug.data.batches import batch_of
from sftplug.data.packing import IGNORE, PackedRows, Rows, Tokenized, doc_targets, plan
from sftplug.data.prepare import prepare_data
from sftplug.data.records import SHOW_LINES, BadLog
from sftplug.data.sources import iter_records
from sftplug.data.tokenizer import Tokenizer
from sftplug.data.tokenizing import tokenize_records
from sftplug.errors import SftplugError
from sftplug.model.transformer import ModelConfig, Transformer


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


class Document(NamedTuple):
    ids: list[int]
    trained: list[bool]  # per token: is it a target the loss counts


def tokenize_file(path, tok, fmt="auto", train_on_prompt=False) -> list[Document]:
    """Every record of a data file as a tokenized document with its loss mask (prepare_data's first half)."""
    bad = BadLog(skip=False)
    tokenized, _, _, _ = tokenize_records(path, iter_records(path, bad), tok, fmt, train_on_prompt, bad)
    ids, trained, s = tokenized.ids.tolist(), tokenized.trained.tolist(), tokenized.starts.tolist()
    return [Document(ids[a:b], trained[a:b]) for a, b in zip(s[:-1], s[1:])]


def tokenized_docs(docs: list[Document]) -> Tokenized:
    parts = [(np.asarray(d.ids, np.int32), np.asarray(d.trained, bool), np.array([len(d.ids)])) for d in docs]
    return Tokenized.concat(parts, np.arange(1, len(docs) + 1), "data")


def pack_tokenized(docs: Tokenized, seq_len: int, pad_id: int, packed: bool, overlong: str) -> tuple[PackedRows, dict]:
    """Rows of documents held in memory (prepare_data's second half), and what happened to them."""
    lengths = np.diff(docs.starts)
    targets = doc_targets(docs.trained, lengths, seq_len)
    layout, counts = plan(docs.starts[:-1], lengths, targets, docs.lines, docs.source, seq_len, packed, overlong)
    return PackedRows(docs.ids, docs.trained, *layout, seq_len, pad_id, counts["target_tokens"]), counts


def pack(docs: list[Document], seq_len: int, pad_id: int, packed: bool = True) -> Rows:
    """Rows of the documents (prepare_data's second half), every row materialized."""
    return pack_tokenized(tokenized_docs(docs), seq_len, pad_id, packed, "truncate")[0].dense()


def reference_pack(docs: Tokenized, seq_len: int, pad_id: int, packed: bool, overlong: str) -> tuple[Rows, dict]:
    """The dense construction rows had before they were built per batch (DATA_FORMAT_VERSION 2), kept as a reference."""
    starts = docs.starts[:-1]
    length = docs.starts[1:] - starts
    positions_needed = length - 1
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
    need = need[keep]
    row, rank, n_rows = data_packing._place(need, seq_len, packed)
    order = np.lexsort((rank, row))  # row by row, each row's documents side by side from column 0
    before = np.cumsum(need[order]) - need[order]
    col = np.empty_like(row)
    col[order] = before - before[np.searchsorted(row[order], row[order])]
    total = int(need.sum())
    doc_of = np.repeat(np.arange(len(keep)), need)
    within = np.arange(total) - np.repeat(np.cumsum(need) - need, need)
    src = starts[keep][doc_of] + within
    dest = (row * seq_len + col)[doc_of] + within
    used = np.bincount(row, weights=need, minlength=n_rows).astype(np.int64)
    docs_per_row = np.bincount(row, minlength=n_rows).astype(np.int64)
    input_ids = np.full(n_rows * seq_len, pad_id, dtype=np.int64)
    input_ids[dest] = docs.ids[src]
    labels = np.full(n_rows * seq_len, IGNORE, dtype=np.int64)
    labels[dest] = np.where(docs.trained[src + 1], docs.ids[src + 1], IGNORE)
    positions = (np.arange(seq_len)[None, :] - used[:, None]).reshape(-1)
    positions[dest] = within
    doc_ids = np.repeat(docs_per_row, seq_len).astype(np.int32)
    doc_ids[dest] = rank[doc_of]
    shape = (n_rows, seq_len)
    rows = Rows(*(torch.from_numpy(a).view(shape) for a in (input_ids, labels, positions, doc_ids)),
                torch.from_numpy(docs_per_row))
    counts.update(documents=len(keep), tokens=total, target_tokens=int((labels != IGNORE).sum()))
    return rows, counts


def tokens_and_mask(tok, tmp_path, record, **kwargs):
    """The one document of a one-record file, in the notation of the expected strings."""
    (doc,) = tokenize_file(write_jsonl(tmp_path / "one.jsonl", [record]), tok, **kwargs)
    out, inside = [], False
    for token_id, trained in zip(doc.ids, doc.trained):
        token = tok.backend.id_to_token(token_id)
        if trained and not inside:
            token = "[" + token
        if not trained and inside:
            out[-1] += "]"
        inside = trained
        out.append(token)
    if inside:
        out[-1] += "]"
    return " ".join(out)


# -- masks, token by token ---------------------------------------------------------------
MASK_CASES = {
    "chat": (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]},
        "<|bos|> <|user|> Ċ H i Ċ <|assistant|> Ċ [Y es . <|eos|>] Ċ",
    ),
    "chat with a system field": (
        {
            "system": "Be brief.",
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}],
        },
        "<|bos|> <|system|> Ċ B e Ġb r i e f . Ċ <|user|> Ċ H i Ċ <|assistant|> Ċ [Y es . <|eos|>] Ċ",
    ),
    "multi-turn chat": (
        {
            "messages": [
                {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "And another?"},
                {"role": "assistant", "content": "Blue."},
            ]
        },
        "<|bos|> <|user|> Ċ N a me Ġa Ġco l or . Ċ <|assistant|> Ċ [R ed . <|eos|>] Ċ "
        "<|user|> Ċ A n d Ġan ot her ? Ċ <|assistant|> Ċ [B lue . <|eos|>] Ċ",
    ),
    "chat ending with a user turn": (
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yes."},
                {"role": "user", "content": "Hi"},
            ]
        },
        "<|bos|> <|user|> Ċ H i Ċ <|assistant|> Ċ [Y es . <|eos|>] Ċ <|user|> Ċ H i Ċ",
    ),
    "prompt/completion": (
        {"prompt": "Count to 3.", "completion": "1, 2, 3."},
        "<|bos|> <|user|> Ċ Count Ġto Ġ 3 . Ċ <|assistant|> Ċ [1 , Ġ 2 , Ġ 3 . <|eos|>] Ċ",
    ),
    "prompt/response": (
        {"prompt": "Hi", "response": "Yes."},
        "<|bos|> <|user|> Ċ H i Ċ <|assistant|> Ċ [Y es . <|eos|>] Ċ",
    ),
    "alpaca": (
        {"instruction": "Sum:", "input": "2 and 3", "output": "5."},
        "<|bos|> <|user|> Ċ S um : Ċ Ċ 2 Ġand Ġ 3 Ċ <|assistant|> Ċ [5 . <|eos|>] Ċ",
    ),
    "alpaca without input": (
        {"instruction": "Hi", "input": "", "output": "Yes."},
        "<|bos|> <|user|> Ċ H i Ċ <|assistant|> Ċ [Y es . <|eos|>] Ċ",
    ),
    "text": ({"text": "The cat sat."}, "[<|bos|> The Ġcat Ġs at . <|eos|>]"),
}


@pytest.mark.parametrize("case", MASK_CASES)
def test_mask_token_by_token(tok, tmp_path, case):
    record, expected = MASK_CASES[case]
    assert tokens_and_mask(tok, tmp_path, record) == expected


def test_train_on_prompt_trains_everything(tok, tmp_path):
    record = MASK_CASES["chat"][0]
    got = tokens_and_mask(tok, tmp_path, record, train_on_prompt=True)
    assert got == "[<|bos|> <|user|> Ċ H i Ċ <|assistant|> Ċ Y es . <|eos|> Ċ]"


def test_labels_in_rows_follow_the_mask(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [MASK_CASES["chat"][0]])
    rows = prepare_data(tok, data=path, seq_len=16).train.dense()
    names = [tok.backend.id_to_token(i) if i != IGNORE else "-" for i in rows.labels[0].tolist()]
    inputs = [tok.backend.id_to_token(i) for i in rows.input_ids[0].tolist()]
    # 13 tokens -> 12 positions: token t predicts token t+1; the last token is never an input.
    assert inputs[:12] == "<|bos|> <|user|> Ċ H i Ċ <|assistant|> Ċ Y es . <|eos|>".split()
    assert names[:12] == "- - - - - - - Y es . <|eos|> -".split()
    assert names[12:] == ["-"] * 4 and inputs[12:] == ["<|pad|>"] * 4


def test_format_override(tok, tmp_path):
    record = {"text": "Hi", "prompt": "Hi", "completion": "Yes."}
    assert tokens_and_mask(tok, tmp_path, record) == MASK_CASES["prompt/response"][1]  # detected: prompt
    assert tokens_and_mask(tok, tmp_path, record, fmt="text") == "[<|bos|> H i <|eos|>]"


# -- packing -----------------------------------------------------------------------------
BOS = 1


def synthetic(lengths, seed=0):
    """Documents of the given token counts: BOS then random tokens, everything trained."""
    rng = random.Random(seed)
    return [Document([BOS] + [rng.randrange(10, 1000) for _ in range(n - 1)], [True] * n) for n in lengths]


def segments(rows, r):
    """(start, end, doc id) of each run of equal doc ids in row r."""
    ids = rows.doc_ids[r].tolist()
    out, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or ids[t] != ids[start]:
            out.append((start, t, ids[start]))
            start = t
    return out


def test_best_fit_decreasing_fills_rows():
    # positions needed 6, 5, 4, 3, 2 in rows of 10: {6, 4} and {5, 3, 2}, both full
    docs = synthetic([3, 7, 5, 6, 4])
    rows = pack(docs, 10, pad_id=0)
    assert len(rows) == 2 and rows.docs_per_row.tolist() == [2, 3]
    assert [[e - s for s, e, _ in segments(rows, r)] for r in range(2)] == [[6, 4], [5, 3, 2]]


def reference_bfd(need, seq_len):
    """Plainly written best-fit decreasing: rows of document indices."""
    rows, free = [], []
    for i in sorted(range(len(need)), key=lambda i: -need[i]):
        fits = [r for r in range(len(rows)) if free[r] >= need[i]]
        if fits:
            r = min(fits, key=lambda r: (free[r], r))
        else:
            r = len(rows)
            rows.append([])
            free.append(seq_len)
        rows[r].append(i)
        free[r] -= need[i]
    return rows


def test_best_fit_decreasing_matches_reference():
    rng = random.Random(1)
    lengths = [rng.randint(2, 40) for _ in range(300)]
    docs = synthetic(lengths)
    rows = pack(docs, 64, pad_id=0)
    expected = reference_bfd([n - 1 for n in lengths], 64)
    got = [list(losses_keys(rows, r)) for r in range(len(rows))]
    want = [[tuple(docs[i].ids[:-1]) for i in members] for members in expected]
    assert got == want


def test_packed_rows_properties():
    lengths = [5, 9, 17, 3, 12, 30, 2, 8, 21, 6, 14]
    docs = synthetic(lengths, seed=3)
    rows = pack(docs, 32, pad_id=0)
    assert int(rows.docs_per_row.max()) > 1
    seen = []
    for r in range(len(rows)):
        ids = rows.doc_ids[r]
        assert bool((ids[1:] >= ids[:-1]).all()), "doc ids are non-decreasing"
        for s, e, d in segments(rows, r):
            assert rows.positions[r, s:e].tolist() == list(range(e - s)), "positions restart per document"
            if d == int(rows.docs_per_row[r]):  # trailing padding: its own document, nothing trained
                assert e == rows.input_ids.shape[1] and bool((rows.labels[r, s:e] == IGNORE).all())
                continue
            inputs, labels = rows.input_ids[r, s:e].tolist(), rows.labels[r, s:e].tolist()
            doc = next(x for x in docs if x.ids[:-1] == inputs)
            assert labels == doc.ids[1:], "each position predicts its own document's next token"
            seen.append(inputs)
    assert len(seen) == len(docs)
    # No position is trained to predict any document's first token (BOS appears only as an input).
    assert not bool((rows.labels == BOS).any())
    assert int((rows.input_ids == BOS).sum()) == len(docs)


def test_no_pack_one_document_per_row(tok):
    docs = synthetic([5, 9, 17])
    rows = pack(docs, 32, pad_id=0, packed=False)
    assert len(rows) == 3 and rows.docs_per_row.tolist() == [1, 1, 1]
    batch = batch_of(rows, [0, 1, 2])
    assert batch["doc_ids"] is None  # one document and trailing padding: plain causal attention
    packed = pack(docs, 32, pad_id=0)
    assert batch_of(packed, [0])["doc_ids"] is not None


def test_overlong_truncate_and_drop(tok, tmp_path):
    records = [{"prompt": "Hi", "completion": "Yes."}] * 3 + [{"prompt": "Hi", "completion": "1, 2, 3. " * 10}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    kept = prepare_data(tok, data=path, seq_len=16, overlong="truncate")
    assert kept.stats.truncated == 1 and kept.stats.truncated_lines == [f"{path}:4"]
    assert kept.stats.dropped == 0
    assert int((kept.train.dense().input_ids != tok.pad_id).sum()) == 3 * 12 + 16
    dropped = prepare_data(tok, data=path, seq_len=16, overlong="drop")
    assert dropped.stats.dropped == 1 and dropped.stats.truncated == 0
    assert int((dropped.train.dense().input_ids != tok.pad_id).sum()) == 3 * 12
    assert "1 truncated" in kept.describe() and "1 dropped" in dropped.describe()
    # A prompt longer than a row leaves nothing to train: left out and counted, not trained on.
    write_jsonl(path, records[:3] + [{"prompt": "Count to 3. " * 5, "completion": "Yes."}])
    long_prompt = prepare_data(tok, data=path, seq_len=16)
    assert long_prompt.stats.untrainable == 1 and long_prompt.stats.untrainable_lines == [f"{path}:4"]
    assert long_prompt.stats.truncated == 0 and long_prompt.train.docs_per_row.sum() == 3
    with pytest.raises(SftplugError, match="no trainable examples"):
        prepare_data(tok, data=path, seq_len=6)  # "<|bos|><|user|>\nHi\n<|assistant|>" fills it

# -- the model: packed == unpacked, and neighbours are invisible ------------------------
@pytest.fixture(scope="module")
def model(tok):
    # One thread: these tiny forwards are ~50x slower when two OpenMP threads share busy cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = ModelConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, n_layers=2, n_heads=4, n_kv_heads=2
    )
    m = Transformer(config)
    m.init_weights(0)
    m.eval()
    yield m
    torch.set_num_threads(threads)


def token_losses(model, rows, doc_ids=True):
    with torch.no_grad():
        logits = model(rows.input_ids, rows.positions, rows.doc_ids if doc_ids else None)
    return F.cross_entropy(logits.flatten(0, 1), rows.labels.flatten(), ignore_index=IGNORE, reduction="none").view(
        rows.labels.shape
    )


def losses_by_document(model, rows):
    """{input tokens of a document: its per-position losses (0 where untrained)}."""
    losses = token_losses(model, rows, doc_ids=int(rows.docs_per_row.max()) > 1)
    out = {}
    for r in range(len(rows)):
        for s, e, d in segments(rows, r):
            if d < int(rows.docs_per_row[r]):
                out[tuple(rows.input_ids[r, s:e].tolist())] = losses[r, s:e]
    return out


def backends():
    out = [sdpa.math]
    if sdpa.flash.why_unavailable() is None:
        out.append(sdpa.flash)
    return out


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    lines = (ASSETS / "default_train.jsonl").read_text().splitlines()[:24]
    path = tmp_path_factory.mktemp("d") / "small.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("backend", backends(), ids=lambda b: b.name)
def test_packed_equals_unpacked_per_token_losses(tok, model, small_data, backend):
    model.set_attention(backend)
    packed = prepare_data(tok, data=small_data, seq_len=96, pack=True).train.dense()
    unpacked = prepare_data(tok, data=small_data, seq_len=96, pack=False).train.dense()
    assert len(packed) < len(unpacked) == 24 and int(packed.docs_per_row.max()) > 2
    a, b = losses_by_document(model, packed), losses_by_document(model, unpacked)
    assert a.keys() == b.keys() and len(a) == 24
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4)
    total = lambda rows: float(token_losses(model, rows, int(rows.docs_per_row.max()) > 1).sum())  # noqa: E731
    assert total(packed) == pytest.approx(total(unpacked), rel=1e-5)


@pytest.mark.parametrize("backend", backends(), ids=lambda b: b.name)
def test_changing_one_document_leaves_its_neighbours_alone(tok, model, small_data, backend):
    model.set_attention(backend)
    rows = prepare_data(tok, data=small_data, seq_len=96).train.dense()
    r = int(torch.argmax(rows.docs_per_row))
    (s0, e0, _), *rest = segments(rows, r)
    changed = Rows(rows.input_ids.clone(), rows.labels, rows.positions, rows.doc_ids, rows.docs_per_row)
    changed.input_ids[r, s0:e0] = torch.randint(10, 1000, (e0 - s0,), generator=torch.Generator().manual_seed(0))
    before, after = token_losses(model, rows), token_losses(model, changed)
    assert not torch.allclose(before[r, s0:e0], after[r, s0:e0])
    torch.testing.assert_close(before[r, e0:], after[r, e0:], atol=1e-6, rtol=0)
    # The check can fail: without doc ids the next document does see the change.
    leaky_before, leaky_after = token_losses(model, rows, doc_ids=False), token_losses(model, changed, doc_ids=False)
    assert not torch.allclose(leaky_before[r, e0:], leaky_after[r, e0:])


# -- bad records ---------------------------------------------------------------------------
GOOD = json.dumps({"prompt": "Hi", "completion": "Yes."})
CHAT_GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]})
BAD_FILES = {
    "invalid JSON": (f'{GOOD}\n{{"prompt": "Hi", "completion": \n', 2, r"invalid JSON \(Expecting value"),
    "not an object": (f"{GOOD}\n[1, 2]\n", 2, "record is a JSON list, not an object"),
    "no known format": ('{"question": "Hi", "answer": "Yes."}\n', 1, "record of no known format.*--field-map renames"),
    "no known format later": (f'{GOOD}\n{GOOD}\n{{"foo": 1}}\n', 3, "no known format.*'prompt' and 'completion'"),
    "another format": (f'{GOOD}\n{{"text": "Hi"}}\n', 2, "a text record in a file of prompt records"),
    "wrong role": (
        CHAT_GOOD + '\n{"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]}\n',
        2,
        "message 1 has role 'human'; expected one of system, user, assistant",
    ),
    "empty content": (
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}\n',
        1,
        r"message 2 \(assistant\) has empty content",
    ),
    "empty completion": (f'{GOOD}\n{{"prompt": "Hi", "completion": ""}}\n', 2, "empty 'completion'"),
    "no assistant": ('{"messages": [{"role": "user", "content": "Hi"}]}\n', 1, "no assistant message"),
    "content not text": (
        '{"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "Yes."}]}\n',
        1,
        "content must be a string, got list",
    ),
}


def bad_file(tmp_path, content):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_record_errors_name_file_line_and_problem(tok, tmp_path, kind):
    content, line, problem = BAD_FILES[kind]
    path = bad_file(tmp_path, content)
    with pytest.raises(SftplugError, match=problem) as caught:
        prepare_data(tok, data=path, seq_len=32)
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert caught.value.exit_code == 2


def test_non_utf8_file(tok, tmp_path):
    path = bad_file(tmp_path, GOOD.encode() + b"\n" + b'{"prompt": "caf\xe9", "completion": "Yes."}\n')
    with pytest.raises(SftplugError, match=rf"^{path}:2: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        prepare_data(tok, data=path, seq_len=32)


def test_empty_file_and_empty_dataset(tok, tmp_path):
    for content in ("", "\n  \n"):
        path = bad_file(tmp_path, content)
        with pytest.raises(SftplugError, match=f"^{path}: no records"):
            prepare_data(tok, data=path, seq_len=32)
    path = bad_file(tmp_path, "[]")
    with pytest.raises(SftplugError, match="no records"):
        prepare_data(tok, data=path, seq_len=32)
    with pytest.raises(SftplugError, match="data file not found"):
        prepare_data(tok, data=tmp_path / "missing.jsonl", seq_len=32)


def test_json_array_records_and_line_numbers(tok, tmp_path):
    records = [json.loads(GOOD), json.loads(CHAT_GOOD)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps([json.loads(GOOD)] * 3, indent=2))
    assert prepare_data(tok, data=path, seq_len=32).stats.records == 3
    records = [json.loads(GOOD), json.loads(GOOD), {"prompt": "Hi", "completion": " "}]
    path.write_text(json.dumps(records, indent=2))  # each record spans 4 lines
    with pytest.raises(SftplugError, match=rf"^{path}:10: empty 'completion'"):
        prepare_data(tok, data=path, seq_len=32)
    path.write_text('[\n {"text": "a"},\n {"text": "b"\n]')
    with pytest.raises(SftplugError, match=rf"^{path}:4: invalid JSON"):
        prepare_data(tok, data=path, seq_len=32)
    path.write_text('[{"text": "a"}] x')
    with pytest.raises(SftplugError, match=rf"^{path}:1: invalid JSON \(extra data"):
        prepare_data(tok, data=path, seq_len=32)


def test_skip_bad_records_counts_and_names_lines(tok, tmp_path):
    lines = [
        GOOD,
        "{not json",
        GOOD,
        '{"foo": 1}',
        '{"prompt": "Hi", "completion": ""}',
        GOOD,
        '{"text": "x"}',
        "[]",
        '{"prompt": 1, "completion": "x"}',
    ]
    raw = ("\n".join(lines) + "\n").encode() + b'{"prompt": "\xff", "completion": "x"}\n' + GOOD.encode()
    path = bad_file(tmp_path, raw)
    with pytest.raises(SftplugError, match=rf"^{path}:2: invalid JSON.*--skip-bad-records"):
        prepare_data(tok, data=path, seq_len=32)
    prepared = prepare_data(tok, data=path, seq_len=32, skip_bad_records=True)
    s = prepared.stats
    assert s.records == 4 and s.skipped_bad == 7
    assert s.skipped_bad_lines == [f"{path}:{n}" for n in (2, 4, 5, 7, 8)]
    assert "skipped 7 bad records" in prepared.describe()
    everything_bad = bad_file(tmp_path, "{x\n{y\n")
    with pytest.raises(SftplugError, match="no usable records: all 2 were bad"):
        prepare_data(tok, data=everything_bad, seq_len=32, skip_bad_records=True)


def test_template_refusal_is_a_bad_record(tmp_path):
    strict = Tokenizer(
        ASSETS,
        chat_template="{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system messages') }}"
        "{% endif %}{{ m.content }}{% endfor %}",
    )
    path = write_jsonl(tmp_path / "d.jsonl", [json.loads(GOOD), {"system": "S", "prompt": "Hi", "completion": "Yes."}])
    with pytest.raises(SftplugError, match=rf"^{path}:2: the chat template failed: no system messages"):
        prepare_data(strict, data=path, seq_len=32)
    assert prepare_data(strict, data=path, seq_len=32, skip_bad_records=True).stats.skipped_bad == 1


# -- eval split ----------------------------------------------------------------------------
def test_eval_split_is_seeded_and_disjoint(tok, small_data):
    a = prepare_data(tok, data=small_data, seq_len=64, eval_split=0.25, seed=1)
    b = prepare_data(tok, data=small_data, seq_len=64, eval_split=0.25, seed=1)
    c = prepare_data(tok, data=small_data, seq_len=64, eval_split=0.25, seed=2)
    assert a.stats.records == 18 and a.stats.eval_records == 6
    assert torch.equal(a.eval.dense().input_ids, b.eval.dense().input_ids)
    assert not torch.equal(a.eval.dense().input_ids, c.eval.dense().input_ids)
    train_docs = set(losses_keys(a.train.dense()))
    eval_docs = set(losses_keys(a.eval.dense()))
    assert len(train_docs) == 18 and len(eval_docs) == 6 and not train_docs & eval_docs


def losses_keys(rows, *only):
    """The input tokens of each document in the rows (or in row ``only``)."""
    for r in only or range(len(rows)):
        for s, e, d in segments(rows, r):
            if d < int(rows.docs_per_row[r]):
                yield tuple(rows.input_ids[r, s:e].tolist())


def test_eval_data_file(tok, small_data):
    p = prepare_data(tok, data=small_data, eval_data=ASSETS / "default_eval.jsonl", seq_len=64)
    assert p.stats.eval_records == 200 and p.eval is not None and p.eval.target_tokens > 0
    assert p.stats.formats == {str(small_data): "prompt", str(ASSETS / "default_eval.jsonl"): "prompt"}


# -- cache ---------------------------------------------------------------------------------
ROW_FIELDS = ("input_ids", "labels", "positions", "doc_ids", "docs_per_row")


def rows_equal(a, b):
    a, b = a.dense(), b.dense()
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ROW_FIELDS)


def test_cache_hit_and_invalidation(tok, tmp_path, small_data):
    cache = tmp_path / "cache"
    path = tmp_path / "d.jsonl"
    shutil.copy(small_data, path)
    kw = dict(seq_len=64, cache_dir=cache, eval_split=0.2)
    first = prepare_data(tok, data=path, **kw)
    assert first.stats.cache == "miss"
    again = prepare_data(tok, data=path, **kw)
    assert again.stats.cache == "hit" and "cache hit" in again.describe()
    assert rows_equal(first.train, again.train) and rows_equal(first.eval, again.eval)
    batch = again.train.batch([0, 1])
    assert batch["input_ids"].dtype == torch.long and batch["doc_ids"].dtype == torch.int32
    # mapped, not loaded: the tokens stay in the cache's files
    assert isinstance(again.train.ids, np.memmap) and isinstance(again.train.trained, np.memmap)
    assert isinstance(again.train.doc_start, np.memmap) and again.eval.ids is again.train.ids
    (entry,) = cache.iterdir()
    assert {p.suffix for p in entry.iterdir()} == {".bin", ".npy", ".json"}  # nothing pickled
    for npy in entry.glob("*.npy"):
        np.load(npy, allow_pickle=False)

    moved = tmp_path / "moved.jsonl"
    shutil.copy(path, moved)
    assert prepare_data(tok, data=moved, **kw).stats.cache == "hit"  # keyed by content, not path

    changes = {
        "seq_len": dict(kw, seq_len=48),
        "pack": dict(kw, pack=False),
        "train_on_prompt": dict(kw, train_on_prompt=True),
        "overlong": dict(kw, overlong="drop"),
        "eval_split": dict(kw, eval_split=0.1),
        "seed": dict(kw, seed=5),
        "fmt": dict(kw, fmt="prompt"),
        "skip_bad_records": dict(kw, skip_bad_records=True),
        "field_map": dict(kw, field_map={"prompt": "question"}),
    }
    for name, options in changes.items():
        if name == "field_map":  # renamed away, prompt records become records of no known format
            with pytest.raises(SftplugError, match="no known format"):
                prepare_data(tok, data=path, **options)
            options = dict(options, field_map={"completion": "response"})
        assert prepare_data(tok, data=path, **options).stats.cache == "miss", name

    with open(path, "a") as f:
        f.write(GOOD + "\n")
    changed = prepare_data(tok, data=path, **kw)
    assert changed.stats.cache == "miss" and changed.stats.records + changed.stats.eval_records == 25

    other_template = Tokenizer(ASSETS, chat_template="chatml")
    assert prepare_data(other_template, data=path, **kw).stats.cache == "miss"
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(ASSETS / "tokenizer_config.json", folder)
    spec = json.loads((ASSETS / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]  # one merge fewer: another tokenizer
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    assert prepare_data(Tokenizer(folder), data=path, **kw).stats.cache == "miss"
    assert prepare_data(tok, data=path, **kw).stats.cache == "hit"


@pytest.mark.parametrize("damage", ["token file cut short", "placement file garbled", "no meta.json"])
def test_damaged_cache_is_rebuilt(tok, tmp_path, small_data, damage):
    cache = tmp_path / "cache"
    first = prepare_data(tok, data=small_data, seq_len=64, cache_dir=cache)
    (entry,) = cache.iterdir()
    if damage == "token file cut short":
        ids = entry / "ids.bin"
        ids.write_bytes(ids.read_bytes()[:-4])
    elif damage == "placement file garbled":
        (entry / "train.row_ptr.npy").write_bytes(b"not an npy file")
    else:  # an entry whose writer stopped before its last file
        (entry / "meta.json").unlink()
    rebuilt = prepare_data(tok, data=small_data, seq_len=64, cache_dir=cache)
    assert rebuilt.stats.cache == "miss" and rows_equal(first.train, rebuilt.train)
    assert prepare_data(tok, data=small_data, seq_len=64, cache_dir=cache).stats.cache == "hit"
    assert [p.name for p in cache.iterdir()] == [entry.name]  # no temporary folder left behind


def test_a_failed_tokenization_leaves_no_cache_entry(tok, tmp_path):
    path = bad_file(tmp_path, f"{GOOD}\n{{x\n")
    with pytest.raises(SftplugError, match="invalid JSON"):
        prepare_data(tok, data=path, seq_len=32, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_killed_tokenizations_folder_is_cleaned_up(tok, tmp_path, small_data):
    cache = tmp_path / "cache"
    entry = prepare_data(tok, data=small_data, seq_len=64, cache_dir=cache).stats.cache_file
    left = Path(entry + ".tmpkilled")  # what a run killed while writing this entry leaves
    shutil.rmtree(entry)
    (left / "ids.bin").parent.mkdir(parents=True)
    (left / "ids.bin").write_bytes(b"\0" * 12)
    assert prepare_data(tok, data=small_data, seq_len=64, cache_dir=cache).stats.cache == "miss"
    assert [p.name for p in cache.iterdir()] == [Path(entry).name]


def test_prepare_matches_the_old_path(tok):
    """prepare_data is tokenizing, then packing: nothing else changes the rows."""
    new = prepare_data(tok, data=ASSETS / "default_train.jsonl", seq_len=128).train
    old = pack(tokenize_file(ASSETS / "default_train.jsonl", tok), 128, tok.pad_id)
    assert rows_equal(new, old)
    assert np.isclose(new.target_tokens, old.target_tokens)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_rows_built_per_batch_equal_the_dense_reference(tok, packed, overlong):
    """The bundled data (and synthetic documents with untrained and overlong ones) give, row for row,
    what the dense construction of DATA_FORMAT_VERSION 2 gave; so does any batch of rows."""
    real = tokenized_docs(tokenize_file(ASSETS / "default_train.jsonl", tok))
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 90, 400)
    synthetic = [Document([BOS] + rng.integers(10, 1000, n - 1).tolist(), (rng.random(n) < 0.6).tolist())
                 for n in lengths]
    for docs, seq_len in ((real, 128), (tokenized_docs(synthetic), 64)):
        rows, counts = pack_tokenized(docs, seq_len, tok.pad_id, packed, overlong)
        want, want_counts = reference_pack(docs, seq_len, tok.pad_id, packed, overlong)
        assert isinstance(rows, PackedRows) and counts == want_counts and rows.target_tokens == want.target_tokens
        assert rows_equal(rows, want) and len(rows) == len(want)
        for picked in ([0], [len(want) - 1, 0, 3], rng.integers(0, len(want), 8).tolist()):
            for trim in (False, True):
                got, expected = rows.batch(picked, trim), want.batch(picked, trim)
                assert got.keys() == expected.keys()
                assert got.pop("tokens") == expected.pop("tokens")
                for name in got:
                    assert (got[name] is None) == (expected[name] is None)
                    assert got[name] is None or torch.equal(got[name], expected[name]), name
    if overlong == "drop":
        assert counts["dropped"] > 0
    else:
        assert counts["truncated"] > 0
    assert counts["untrainable"] > 0
