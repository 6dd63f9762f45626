"""The data cache: one folder per entry under OUT/cache/, memory-mapped by every run that uses it.

An entry holds the tokens as raw arrays (``ids.bin`` int32, ``trained.bin`` one byte per
token), each part's placement of documents into rows (``.npy``) and ``meta.json``, written
last; the folder is written under a temporary name and renamed into place. No pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from sftplug.data.packing import PackedRows
from sftplug.data.stats import DataStats
from sftplug.data.tokenizer import Tokenizer

# Bump when tokens, masks, row layout or the cache's files produced from the same inputs change.
DATA_FORMAT_VERSION = 4


def cache_key(data_sha256: str, eval_sha256: str | None, tokenizer: Tokenizer, options: dict) -> str:
    material = {
        "version": DATA_FORMAT_VERSION,
        "data": data_sha256,
        "eval_data": eval_sha256,
        "tokenizer": tokenizer.fingerprint(),
        **options,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


LAYOUT = ("doc_start", "need", "row_ptr")  # PackedRows' placement arrays, one .npy each


def map_tokens(folder: Path, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.memmap(folder / "ids.bin", dtype=np.int32, mode="r")
    trained = np.memmap(folder / "trained.bin", dtype=np.bool_, mode="r")
    if len(ids) != tokens or len(trained) != tokens:
        raise ValueError("token files of the wrong size")
    return ids, trained


class Cache:
    """One folder per entry: token files (raw int32 / bool), placements (.npy), meta.json; never pickle.

    An entry is written under a temporary name, meta.json last, then renamed into place;
    an entry that is partial, damaged or of another version is rebuilt, never trusted.
    """

    def __init__(self, folder, key: str):
        self.folder, self.key = Path(folder), key
        self.entry = self.folder / f"data-{key[:24]}"

    def load(self) -> tuple[PackedRows, PackedRows | None, DataStats] | None:
        """The entry's train rows, eval rows (or None) and stats, mapped; None when there is no sound entry."""
        try:
            meta = json.loads((self.entry / "meta.json").read_text())
            if meta.get("key") != self.key or meta.get("version") != DATA_FORMAT_VERSION:
                return None
            tokens = map_tokens(self.entry, meta["tokens"])
            rows = {}
            for part, target in meta["target_tokens"].items():
                layout = [np.load(self.entry / f"{part}.{name}.npy", mmap_mode="r", allow_pickle=False)
                          for name in LAYOUT]
                if not len(layout[0]) == len(layout[1]) == layout[2][-1]:
                    return None
                rows[part] = PackedRows(*tokens, *layout, meta["seq_len"], meta["pad_id"], target)
            return rows["train"], rows.get("eval"), DataStats(**meta["stats"])
        except Exception:  # a damaged cache is rebuilt, never trusted
            return None

    def begin(self) -> Path:
        """A new, empty folder to write the entry into."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for left in self.folder.glob(f"{self.entry.name}.tmp*"):  # by a run killed while tokenizing
            shutil.rmtree(left, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f"{self.entry.name}.tmp", dir=self.folder))

    def commit(self, folder: Path, train: PackedRows, eval: PackedRows | None, stats: DataStats) -> None:
        """The entry written in ``folder``, meta.json added last, put in place (its rows map it already)."""
        rows = {"train": train, "eval": eval}
        meta = {
            "key": self.key, "version": DATA_FORMAT_VERSION, "tokens": len(train.ids),
            "seq_len": train.seq_len, "pad_id": train.pad_id,
            "target_tokens": {part: r.target_tokens for part, r in rows.items() if r is not None},
            "stats": stats.saved(),
        }  # fmt: skip
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(self.entry, ignore_errors=True)  # a damaged or older entry of the same key
        os.replace(folder, self.entry)
