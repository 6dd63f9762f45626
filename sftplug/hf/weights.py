"""The weight files of an HF model folder: find, validate, read tensor by tensor, write.

Reading never holds a second copy of the model: each tensor's bytes are read from the file
straight into the (slice of the) parameter it belongs to, in chunks of at most 64 MiB when a
dtype conversion or a device copy is needed. No file is memory-mapped, so the resident
memory of a load is the model plus one chunk. ``safe_open`` validates every file first.

Pickle ``.bin`` checkpoints are refused: unpickling can run arbitrary code. Setting
``SFTPLUG_ALLOW_BIN=1`` opts in to loading them with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sftplug.dtypes import SAFETENSORS
from sftplug.errors import SftplugError

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
ALLOW_BIN_ENV = "SFTPLUG_ALLOW_BIN"
CHUNK_BYTES = 64 * 2**20


@dataclass
class TensorEntry:
    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple
    offset: int = 0  # absolute byte offset of the data in the file (safetensors)
    tensor: torch.Tensor | None = None  # the tensor itself (opt-in .bin only)
    fill: Callable | None = None  # fill(dest, handle): a tensor stored in another form (sftplug.hf.mxfp4)


@dataclass
class WeightFiles:
    folder: Path
    files: list[Path]
    where: str  # what to name when a tensor is missing: the single file or the index
    entries: dict[str, TensorEntry]

    def by_file(self) -> dict[Path, list[TensorEntry]]:
        """Entries grouped by file, in file order (sequential reads)."""
        grouped: dict[Path, list[TensorEntry]] = {f: [] for f in self.files}
        for e in self.entries.values():
            grouped[e.file].append(e)
        return {f: sorted(es, key=lambda e: e.offset) for f, es in grouped.items()}


def has_weight_files(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or (folder / SAFE_INDEX).is_file()


def open_weights(folder: str | Path) -> WeightFiles:
    """Find, validate and index the weight files of an HF folder (single file or sharded)."""
    folder = Path(folder)
    if (folder / SAFE_SINGLE).is_file():
        return _scan(folder, [folder / SAFE_SINGLE], SAFE_SINGLE, _read_safetensors_header)
    if (folder / SAFE_INDEX).is_file():
        return _scan_index(folder, folder / SAFE_INDEX, _read_safetensors_header)
    bins = [p for p in (folder / BIN_SINGLE, folder / BIN_INDEX) if p.is_file()]
    if bins:
        if os.environ.get(ALLOW_BIN_ENV, "") != "1":
            raise SftplugError(
                f"{folder}: the weights are pickle files ({bins[0].name}); sftplug loads safetensors only, because "
                "unpickling a file can run arbitrary code. Convert them (transformers: "
                "model.save_pretrained(out, safe_serialization=True)), or set "
                f"{ALLOW_BIN_ENV}=1 to load them with torch.load(weights_only=True)"
            )
        if bins[0].name == BIN_SINGLE:
            return _scan(folder, [bins[0]], BIN_SINGLE, _read_bin)
        return _scan_index(folder, bins[0], _read_bin)
    raise SftplugError(f"{folder}: no weights ({SAFE_SINGLE} or {SAFE_INDEX} with its shards)")


def _scan(folder: Path, files: list[Path], where: str, read_header) -> WeightFiles:
    entries: dict[str, TensorEntry] = {}
    for path in files:
        for entry in read_header(path):
            if entry.key in entries:
                raise SftplugError(
                    f"{folder}: tensor '{entry.key}' is in both {entries[entry.key].file.name} and {path.name}"
                )
            entries[entry.key] = entry
    return WeightFiles(folder, files, where, entries)


def _scan_index(folder: Path, index_path: Path, read_header) -> WeightFiles:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise SftplugError(f"{index_path}: corrupt shard index ({exc})") from None
    files = [folder / name for name in sorted(set(weight_map.values()))]
    for path in files:
        if not path.is_file():
            raise SftplugError(f"{index_path}: lists the shard {path.name}, which is missing from {folder}")
    weights = _scan(folder, files, index_path.name + " and its shards", read_header)
    for key, name in weight_map.items():
        entry = weights.entries.get(key)
        if entry is None or entry.file.name != name:
            raise SftplugError(f"{index_path}: says '{key}' is in {name}, but {name} does not contain it")
    return weights


def _read_safetensors_header(path: Path) -> list[TensorEntry]:
    """The tensors of one safetensors file, validated by safe_open; offsets from its header."""
    corrupt = f"{path}: not a valid safetensors file"
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SftplugError(f"{corrupt} ({exc}); the file is corrupt or truncated, download or save it again") from None
    entries = []
    for key in keys:
        info = header[key]
        dtype = SAFETENSORS.get(info["dtype"])
        if dtype is None:
            raise SftplugError(f"{path}: tensor '{key}' has dtype {info['dtype']}, which sftplug cannot load")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * dtype.itemsize or 8 + n + end > size:
            raise SftplugError(f"{corrupt} (tensor '{key}' does not fit its bytes); the file is corrupt or truncated")
        entries.append(TensorEntry(key, path, dtype, shape, offset=8 + n + start))
    return entries


def _read_bin(path: Path) -> list[TensorEntry]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise SftplugError(f"{path}: cannot be read with torch.load(weights_only=True) ({exc})") from None
    return [TensorEntry(k, path, t.dtype, tuple(t.shape), tensor=t) for k, t in state.items()]


def read_into(entry: TensorEntry, dest: torch.Tensor, handle=None) -> None:
    """Fill ``dest`` (contiguous, same number of elements) with the tensor ``entry`` names."""
    with torch.no_grad():
        if entry.fill is not None:
            entry.fill(dest, handle)
            return
        if entry.tensor is not None:
            dest.copy_(entry.tensor.reshape(dest.shape))
            return
        flat = dest.detach().view(-1)
        own = handle is None
        f = open(entry.file, "rb", buffering=0) if own else handle
        try:
            f.seek(entry.offset)
            if flat.dtype == entry.dtype and flat.device.type == "cpu":  # straight into the parameter
                _read_exact(f, flat.view(torch.uint8).numpy(), entry.file)
                return
            step = max(1, CHUNK_BYTES // entry.dtype.itemsize)
            buffer = torch.empty(min(step, flat.numel()), dtype=entry.dtype)
            for start in range(0, flat.numel(), step):
                part = buffer[: min(step, flat.numel() - start)]
                _read_exact(f, part.view(torch.uint8).numpy(), entry.file)
                flat[start : start + part.numel()].copy_(part)
        finally:
            if own:
                f.close()


def _read_exact(f, array, path: Path) -> None:
    view = memoryview(array).cast("B")
    done = 0
    while done < len(view):
        n = f.readinto(view[done : done + CHUNK_BYTES])
        if not n:
            raise SftplugError(f"{path}: ends early; the file is truncated, download or save it again")
        done += n


def save_weights(
    folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int, dtype=None, metadata=None
) -> list[str]:
    """Write HF-style weights: model.safetensors, or shards plus model.safetensors.index.json.

    Tensors are cast to ``dtype`` (None: as they are) one shard at a time.
    """
    metadata = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for name, t in tensors.items():
        nbytes = t.numel() * (dtype or t.dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
        total += nbytes
    if len(shards) == 1:
        names = [SAFE_SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        # Own storage per tensor: the split q/k/v rows are views of one fused parameter.
        own = {k: t.detach().to(device="cpu", dtype=dtype or t.dtype, copy=True).contiguous() for k, t in shard.items()}
        save_file(own, str(folder / name), metadata)
        del own
        weight_map.update(dict.fromkeys(shard, name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2))
    return names
