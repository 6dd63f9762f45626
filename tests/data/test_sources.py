"""Data sources: the same records from JSONL, a JSON array, gzip, parquet and a datasets folder.

Every source must give the same ``(number, record)`` sequence and the same tokenized rows as
the JSONL file; ``--field-map`` renames; each error is one line; JSONL is streamed.
"""

import gzip
import hashlib
import json
import sys
import tracemalloc

import pytest
import torch

from sftplug.data import sources
from sftplug.data.prepare import prepare_data
from sftplug.data.records import BadLog
from sftplug.data.tokenizing import tokenize_records
from sftplug.errors import SftplugError

pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")


def chat(*turns):
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": r, "content": c} for r, c in zip(roles, turns)]}


RECORDS = [
    chat("What is 2+2?", "4."),
    chat("Name a colour.", "Blue.", "Another?", "Green."),
    chat("Say hi in French.", "Bonjour."),
    chat("Count to three.", "1, 2, 3.", "And back?", "3, 2, 1.", "Thanks.", "You're welcome."),
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write(kind, folder, records=RECORDS):
    """``records`` as a source of ``kind`` under ``folder``."""
    if kind == "jsonl":
        return write_jsonl(folder / "d.jsonl", records)
    if kind == "json array":
        path = folder / "d.json"
        path.write_text(json.dumps(records, indent=1))
        return path
    if kind == "jsonl.gz":
        path = folder / "d.jsonl.gz"
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
        return path
    if kind == "parquet":
        path = folder / "d.parquet"
        pq.write_table(datasets.Dataset.from_list(records).data.table, path, row_group_size=3)
        return path
    if kind == "datasets folder":
        path = folder / "saved"
        datasets.Dataset.from_list(records).save_to_disk(str(path), max_shard_size=200)  # several shards
        return path
    raise AssertionError(kind)


KINDS = ("jsonl", "json array", "jsonl.gz", "parquet", "datasets folder")


def read(path, **kwargs):
    return [record for _, record in sources.iter_records(path, BadLog(skip=False), **kwargs)]


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_gives_the_same_records(tmp_path, kind):
    path = write(kind, tmp_path)
    assert read(path) == RECORDS
    numbers = [n for n, _ in sources.iter_records(path, BadLog(skip=False))]
    if kind in ("parquet", "datasets folder"):
        assert numbers == [1, 2, 3, 4]  # rows
    elif kind == "json array":
        assert numbers[0] == 2 and numbers == sorted(numbers) and len(set(numbers)) == 4  # the line each starts on
    else:
        assert numbers == [1, 2, 3, 4]
    if kind == "datasets folder":
        assert len(json.loads((path / "state.json").read_text())["_data_files"]) > 1  # the order of shards is kept


@pytest.mark.parametrize("kind", KINDS[1:])
def test_every_source_gives_the_jsonl_rows(tok, tmp_path, kind):
    reference = write("jsonl", tmp_path)
    path = write(kind, tmp_path)

    def documents(p):
        bad = BadLog(skip=False)
        docs, fmt, _, _ = tokenize_records(p, sources.iter_records(p, bad), tok, "auto", False, bad)
        return docs.ids.tolist(), docs.trained.tolist(), fmt

    assert documents(path) == documents(reference)


@pytest.mark.parametrize("kind", KINDS[1:])
def test_every_source_gives_the_jsonl_rows_through_prepare_data(tok, tmp_path, kind):
    reference, path = write("jsonl", tmp_path), write(kind, tmp_path)
    expected, got = prepare_data(tok, data=reference, seq_len=48), prepare_data(tok, data=path, seq_len=48)
    for name in ("input_ids", "labels", "positions", "doc_ids", "docs_per_row"):
        assert torch.equal(getattr(got.train.dense(), name), getattr(expected.train.dense(), name)), name
    assert got.stats.records == expected.stats.records == len(RECORDS)


def test_the_record_numbers_of_tables_count_rows_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BATCH_ROWS", 3)
    many = [{"text": f"record {i}"} for i in range(10)]
    for kind in ("parquet", "datasets folder"):
        found = list(sources.iter_records(write(kind, tmp_path, many), BadLog(skip=False)))
        assert found == [(i + 1, r) for i, r in enumerate(many)], kind


# -- --field-map ----------------------------------------------------------------------------
QA = [{"question": "What is 2+2?", "answer": "4.", "id": 1}, {"question": "Hi?", "answer": "Hello.", "id": 2}]


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "datasets folder"])
def test_field_map_renames_fields(tmp_path, kind):
    path = write(kind, tmp_path, QA)
    renamed = read(path, field_map={"question": "prompt", "answer": "completion"})
    assert renamed == [{"prompt": q["question"], "completion": q["answer"], "id": q["id"]} for q in QA]
    assert sources.first_record(path, {"question": "prompt", "answer": "completion"})["prompt"] == "What is 2+2?"


def test_field_map_through_tokenizing_equals_the_renamed_file(tok, tmp_path):
    mapped = write_jsonl(tmp_path / "qa.jsonl", QA)
    plain = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": q["question"], "completion": q["answer"]} for q in QA])

    def ids(path, field_map=None):
        bad = BadLog(skip=False)
        return tokenize_records(path, sources.iter_records(path, bad, field_map), tok, "auto", False, bad)[0].ids

    field_map = {"question": "prompt", "answer": "completion"}
    with pytest.raises(SftplugError, match="no known format"):
        ids(mapped)
    assert torch.equal(torch.as_tensor(ids(mapped, field_map)), torch.as_tensor(ids(plain)))
    expected = prepare_data(tok, data=plain, seq_len=32).train.dense()
    got = prepare_data(tok, data=mapped, seq_len=32, field_map=field_map).train.dense()
    assert torch.equal(got.input_ids, expected.input_ids) and torch.equal(got.labels, expected.labels)


def test_field_map_problems_are_the_records(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [QA[0], {"question": "Q", "reply": "A"}, QA[1]])
    field_map = {"question": "prompt", "answer": "completion"}
    missing = r"no field 'answer' to rename \(--field-map answer=completion\)"
    with pytest.raises(SftplugError, match=rf"^{path}:2: {missing}"):
        read(path, field_map=field_map)
    bad = BadLog(skip=True)
    assert [n for n, _ in sources.iter_records(path, bad, field_map)] == [1, 3]
    assert bad.count == 1 and bad.first == [f"{path}:2"]
    with pytest.raises(SftplugError, match=rf"^{path}:1: already has a field 'id' \(--field-map question=id"):
        read(path, field_map={"question": "id"})
    swapped = sources.first_record(path, {"question": "answer", "answer": "question"})  # a swap overwrites nothing
    assert swapped["answer"] == QA[0]["question"] and swapped["question"] == QA[0]["answer"]


# -- errors, one line each --------------------------------------------------------------------
def one_line_error(path, call=read):
    with pytest.raises(SftplugError) as caught:
        call(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


def test_errors_are_one_line(tmp_path):
    assert "data file not found" in one_line_error(tmp_path / "missing.jsonl")
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,completion\n")
    assert "unsupported data file; sftplug reads .jsonl, .json" in one_line_error(csv)
    assert "save_to_disk" in one_line_error(csv)
    empty_folder = tmp_path / "folder"
    empty_folder.mkdir()
    assert "is a folder without a datasets state.json" in one_line_error(empty_folder)
    not_gzip = tmp_path / "d.jsonl.gz"
    not_gzip.write_text('{"text": "a"}\n')
    assert "cannot be read (Not a gzipped file" in one_line_error(not_gzip)
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:-20])
    assert "cannot be read (Compressed file ended" in one_line_error(truncated)
    not_parquet = tmp_path / "d.parquet"
    not_parquet.write_text('{"text": "a"}\n')
    assert "cannot be read" in one_line_error(not_parquet)
    for call in (sources.fingerprint, sources.first_record):
        assert "data file not found" in one_line_error(tmp_path / "missing.parquet", call)
        assert "unsupported data file" in one_line_error(csv, call)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert "no records" in one_line_error(empty, sources.first_record)


def test_a_dataset_dict_folder_asks_for_a_split(tmp_path):
    folder = tmp_path / "data"
    split = datasets.Dataset.from_list(RECORDS)
    datasets.DatasetDict(train=split, test=split).save_to_disk(str(folder))
    message = one_line_error(folder)
    assert "DatasetDict" in message and f"e.g. {folder / 'train'}" in message
    assert read(folder / "train") == RECORDS


def test_without_pyarrow_tables_say_how_to_install_it(tmp_path, monkeypatch):
    jsonl, path = write("jsonl", tmp_path), write("parquet", tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now fails
    assert one_line_error(path).endswith("pip install 'sftplug[parquet]'")
    assert read(jsonl) == RECORDS  # JSON needs no pyarrow


def test_bad_lines_in_gzip_are_reported_like_plain_ones(tmp_path):
    raw = b'{"text": "a"}\n{not json\n{"text": "caf\xe9"}\n{"text": "b"}\n'
    plain, packed = tmp_path / "d.jsonl", tmp_path / "d.jsonl.gz"
    plain.write_bytes(raw)
    packed.write_bytes(gzip.compress(raw))
    for path in (plain, packed):
        with pytest.raises(SftplugError, match=rf"^{path}:2: invalid JSON \(Expecting property name"):
            read(path)
        bad = BadLog(skip=True)
        assert [n for n, _ in sources.iter_records(path, bad)] == [1, 4]
        assert bad.first == [f"{path}:2", f"{path}:3"]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf\n" + raw[:14])
    assert read(bom) == [{"text": "a"}]
    bom.write_bytes(b"\xef\xbb\xbf" + raw[:14])
    assert read(bom) == [{"text": "a"}]


# -- fingerprints -------------------------------------------------------------------------
def test_fingerprint_follows_the_content(tmp_path):
    path = write("jsonl", tmp_path)
    assert sources.fingerprint(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    folder = write("datasets folder", tmp_path)
    before = sources.fingerprint(folder)
    assert before == sources.fingerprint(folder)
    changed = RECORDS[:-1] + [chat("Count to three.", "1, 2, 4.", "And back?", "3, 2, 1.", "Thanks.", "Sure.")]
    (tmp_path / "other").mkdir()
    assert sources.fingerprint(write("datasets folder", tmp_path / "other", changed)) != before
    assert sources.fingerprint(write("datasets folder", tmp_path / "other")) == before


# -- streaming ----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_jsonl_is_streamed_not_read_whole(tmp_path, suffix):
    line = json.dumps(chat("x" * 400, "y" * 400)) + "\n"
    raw = (line * 10_000).encode()  # 8.5 MB
    path = tmp_path / f"big{suffix}"
    path.write_bytes(gzip.compress(raw, compresslevel=1) if suffix.endswith(".gz") else raw)
    tracemalloc.start()
    try:
        count = sum(1 for _ in sources.iter_records(path, BadLog(skip=False)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 10_000
    assert peak < len(raw) / 40, f"peak {peak:,} bytes for a {len(raw):,}-byte file"
