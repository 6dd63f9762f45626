"""Tokenizing in worker processes gives byte for byte the cache one process gives, bad records included."""

import json

import numpy as np
import pytest
import torch

from sftplug.config import ASSETS
from sftplug.data import tokenizing
from sftplug.data.batches import Batches
from sftplug.data.prepare import prepare_data
from sftplug.errors import SftplugError


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 50 records, the first in this process, the rest in workers (when there are any)."""
    monkeypatch.setattr(tokenizing, "ENCODE_CHUNK", 50)
    monkeypatch.setattr(tokenizing, "INLINE_CHUNKS", 1)

    def with_workers(n: int):
        monkeypatch.setattr(tokenizing, "TOKENIZE_WORKERS", n)

    return with_workers


def with_bad_records(tmp_path):
    """The bundled records, with bad ones found while reading, while checking formats and while rendering."""
    lines = (ASSETS / "default_train.jsonl").read_text().splitlines()[:900]
    lines[120] = '{"prompt": "Hi", "completion": ""}'  # found by the worker that renders it
    lines[130] = "{not json"  # found while reading, after the one above
    lines[400] = '{"foo": 1}'  # no known format: found while checking
    lines[401] = '{"prompt": "Hi", "completion": 3}'
    lines[899] = '{"text": "a text record in a file of prompt records"}'
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def cache_files(folder):
    (entry,) = folder.iterdir()
    files = {p.name: p.read_bytes() for p in entry.iterdir() if p.name != "meta.json"}
    stats = json.loads((entry / "meta.json").read_text())["stats"]
    for varies in ("seconds", "records_per_s", "cache_file"):
        stats.pop(varies)
    return files, stats


def test_workers_give_the_cache_one_process_gives(tok, tmp_path, small_chunks, monkeypatch):
    path = with_bad_records(tmp_path)
    pools, real_pool = [], tokenizing._pool
    monkeypatch.setattr(tokenizing, "_pool", lambda tok, workers: pools.append(workers) or real_pool(tok, workers))
    caches = {}
    for workers in (1, 2):
        small_chunks(workers)
        cache = tmp_path / f"cache{workers}"
        prepared = prepare_data(tok, data=path, seq_len=128, eval_split=0.1, skip_bad_records=True, cache_dir=cache)
        assert prepared.stats.cache == "miss"
        caches[workers] = cache_files(cache)
    assert pools == [2]  # one process, then two workers
    one, two = caches[1], caches[2]
    assert one[0].keys() == {"ids.bin", "trained.bin", "train.doc_start.npy", "train.need.npy", "train.row_ptr.npy",
                             "eval.doc_start.npy", "eval.need.npy", "eval.row_ptr.npy"}
    for name in one[0]:
        assert one[0][name] == two[0][name], name
    assert one[1] == two[1]
    assert one[1]["skipped_bad"] == 5
    assert one[1]["skipped_bad_lines"] == [f"{path}:{n}" for n in (121, 131, 401, 402, 900)]


def test_workers_report_the_first_bad_record_in_file_order(tok, tmp_path, small_chunks):
    path = with_bad_records(tmp_path)
    for workers in (1, 2):
        small_chunks(workers)
        with pytest.raises(SftplugError, match=rf"^{path}:121: empty 'completion'"):
            prepare_data(tok, data=path, seq_len=128)


def test_mapped_rows_in_dataloader_workers(tok, tmp_path):
    """Forked DataLoader workers read the memory-mapped cache: the same batches as the main process."""
    kw = dict(data=ASSETS / "default_train.jsonl", seq_len=64, cache_dir=tmp_path / "cache")
    prepare_data(tok, **kw)
    rows = prepare_data(tok, **kw).train
    assert isinstance(rows.ids, np.memmap)
    inline, prefetched = Batches(rows, 4, seed=0), Batches(rows, 4, seed=0, workers=2)
    try:
        for _ in range(5):
            a, b = inline.next(), prefetched.next()
            assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "positions", "doc_ids"))
    finally:
        prefetched.close()
