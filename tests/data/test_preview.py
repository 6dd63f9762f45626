"""The preview marks exactly the tokens training trains, token by token.

prepare_data's labels are shifted: the label at position t of a row is token t+1 of the
document (or IGNORE), so a marked token j must be exactly a position t = j - 1 whose label
is not IGNORE, and that label must be the token itself.
"""

import json

import pytest
import torch

from sftplug.config import ASSETS
from sftplug.data.packing import IGNORE
from sftplug.data.prepare import prepare_data
from sftplug.data.preview import CLOSE, OPEN, preview_documents, render, stats_lines
from sftplug.data.tokenizer import Tokenizer

CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another, in German?"},
    {"role": "assistant", "content": "Grün."},
    {"role": "user", "content": "And a fruit?"},
    {"role": "assistant", "content": "A pear (日本: 梨)."},
]}  # fmt: skip
SHORT = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]}
ANSWERS = ["Blue.", "Grün.", "A pear (日本: 梨)."]
TURN_END = {"sftplug": "<|eos|>", "chatml": "<|im_end|>\n"}  # with the bundled tokenizer EOS is <|eos|>


def tokenizer(template):
    tok = Tokenizer(ASSETS)
    tok.set_chat_template(template)
    return tok


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def trained_positions(doc, rows, row):
    """The document's token indexes whose label is trained, read from prepare_data's row."""
    n = len(doc.ids)
    assert rows.input_ids[row, : n - 1].tolist() == doc.ids[:-1]  # the same tokens, in the same place
    labels = rows.labels[row, : n - 1]
    found = {t + 1 for t in torch.nonzero(labels != IGNORE).flatten().tolist()}
    assert all(labels[j - 1] == doc.ids[j] for j in found)  # the label is the next token itself
    return found


def marked_positions(doc):
    return {j for j, m in enumerate(doc.marked) if m}


@pytest.mark.parametrize("template", ["sftplug", "chatml"])
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_marks_are_exactly_the_trained_labels(tmp_path, template, train_on_prompt):
    tok = tokenizer(template)
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT])
    (doc,) = preview_documents(tok, path, 3, seq_len=512, train_on_prompt=train_on_prompt)
    rows = prepare_data(tok, data=path, seq_len=512, pack=False, train_on_prompt=train_on_prompt).train.dense()
    assert marked_positions(doc) == trained_positions(doc, rows, 0)
    assert "".join(doc.pieces) == tok.decode(doc.ids, skip_special_tokens=False)  # 日本 and ü come out whole
    if train_on_prompt:
        assert marked_positions(doc) == set(range(1, len(doc.ids)))  # all but the first token: nothing predicts it
    else:
        text = render(doc)
        spans = [part.split(CLOSE)[0] for part in text.split(OPEN)[1:]]
        assert spans == [answer + TURN_END[template] for answer in ANSWERS]  # three assistant turns, nothing else


def test_several_records_truncated_and_packed(tmp_path):
    tok = tokenizer("sftplug")
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT, SHORT, CHAT])
    seq_len = 47  # CHAT's 88 tokens are cut inside the second answer, between the two bytes of its ü
    docs = preview_documents(tok, path, 2, seq_len=seq_len)
    assert [d.number for d in docs] == [1, 2] and len(docs[0].ids) == seq_len + 1 and docs[0].cut == 88 - 48
    rows = prepare_data(tok, data=path, seq_len=seq_len, pack=False).train.dense()
    for doc in docs:
        (row,) = [r for r in range(len(rows)) if rows.input_ids[r, : len(doc.ids) - 1].tolist() == doc.ids[:-1]][:1]
        assert marked_positions(doc) == trained_positions(doc, rows, row)
    assert render(docs[0]).endswith(f"<|assistant|>\n{OPEN}Gr{CLOSE}")


def test_a_dropped_document_has_no_marks(tmp_path):
    tok = tokenizer("sftplug")
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT, SHORT])
    long, short = preview_documents(tok, path, 2, seq_len=40, overlong="drop")
    assert long.dropped and not any(long.marked) and not short.dropped
    prepared = prepare_data(tok, data=path, seq_len=40, overlong="drop")
    assert prepared.stats.dropped == 1 and prepared.stats.target_tokens == sum(short.marked)


def test_render_styles_each_trained_run(tmp_path):
    tok = tokenizer("sftplug")
    (doc,) = preview_documents(tok, write_jsonl(tmp_path / "d.jsonl", [SHORT]), 1, seq_len=64)
    assert render(doc) == f"<|bos|><|user|>\nWhat is 2+2?\n<|assistant|>\n{OPEN}4.<|eos|>{CLOSE}\n"
    assert render(doc, style=lambda s: s.upper()) == "<|bos|><|user|>\nWhat is 2+2?\n<|assistant|>\n4.<|EOS|>\n"


def test_stats_lines_are_prepare_datas(tmp_path):
    tok = tokenizer("sftplug")
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, SHORT, SHORT, {"prompt": "x", "completion": "y"}])
    prepared = prepare_data(tok, data=path, seq_len=40, skip_bad_records=True)
    s = prepared.stats
    lines = stats_lines(prepared)
    assert lines[0] == "records: 3 (chat)"
    assert lines[1] == f"tokens: {s.tokens:,} (input positions); trained: {s.target_tokens:,} " \
                       f"({s.target_tokens / s.tokens:.1%})"
    assert lines[2] == f"rows: {s.rows} of 40 (packed, {s.fill:.1%} filled)"
    assert lines[3] == "truncated: 1; dropped: 0; untrainable: 0; bad records skipped: 1"
