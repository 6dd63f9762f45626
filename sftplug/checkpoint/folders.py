"""Checkpoints: OUT/checkpoints/step-<N>/ written atomically, OUT/checkpoints/latest last.

A checkpoint is written under a temporary name, each file flushed to disk, then renamed;
only then does ``latest`` move (itself replaced atomically). ``run.json`` lists every file
with its size, so a truncated or missing file is caught before anything is loaded.

What goes into a checkpoint, and how a run comes back from one, is
:mod:`sftplug.checkpoint.run_state`; an FSDP run's ``shards/`` are :mod:`sftplug.checkpoint.shards`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from sftplug.errors import SftplugError

FORMAT = "sftplug-checkpoint"
# The names of a checkpoint's files, defined here only.
MANIFEST = "run.json"
WEIGHTS = "model.safetensors"  # the trainable weights (LoRA: the adapter)
STATE = "state.pt"  # every plugin's resume_state
SHARDS = "shards"  # instead of WEIGHTS in an FSDP run: each rank's shards, optimizer state included
LATEST = "latest"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def give_normal_modes(root: Path) -> None:
    """Give every file under ``root`` the mode a plain new file gets: 0666 less the umask.

    Writers differ: safetensors' save_file leaves 0600, shutil.copy keeps its source's mode.
    """
    umask = os.umask(0)
    os.umask(umask)  # the umask is read by setting it: put it back at once
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def write_checkpoint(out: str | Path, step: int, meta: dict, writers: dict) -> Path:
    """Write step-<step> from ``writers`` (file name -> fn(path)) and the manifest, atomically."""
    tmp = begin(out, step)
    for name, write in writers.items():
        write(tmp / name)
    return commit(out, step, meta)


def step_folder(out: str | Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step}"


def staging(out: str | Path, step: int) -> Path:
    """The folder a checkpoint is written in before it is complete (the same on every rank)."""
    return Path(out) / "checkpoints" / f".tmp-step-{step}"


def begin(out: str | Path, step: int) -> Path:
    """An empty staging folder for step-<step>, after cleaning up any writer that died."""
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    recover(root)
    tmp = staging(out, step)
    tmp.mkdir()
    return tmp


def commit(out: str | Path, step: int, meta: dict) -> Path:
    """Flush the staged files, add the manifest, rename to step-<step>, then move ``latest``."""
    root, tmp = Path(out) / "checkpoints", staging(out, step)
    final = step_folder(out, step)
    paths = sorted(p for p in tmp.rglob("*") if p.is_file())
    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in paths}
    for path in paths:
        _fsync_file(path)
    manifest = {"format": FORMAT, "version": 1, "step": step, "files": files, **meta}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _fsync_file(tmp / MANIFEST)
    for folder in {p.parent for p in paths} | {tmp}:
        _fsync_dir(folder)
    if final.exists():  # re-saving the same step: the old copy goes only after the new one is in place
        old = root / f".old-step-{step}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    _fsync_file(latest_tmp)
    os.replace(latest_tmp, root / LATEST)
    _fsync_dir(root)
    return final


def recover(root: Path) -> None:
    """Clean up after a writer that died: drop half-written folders, restore a displaced one."""
    for path in root.glob(".tmp-step-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(".old-step-*"):
        final = root / ("step-" + path.name.split("-")[2])
        if final.exists():
            shutil.rmtree(path, ignore_errors=True)
        else:  # died between moving the old copy aside and putting the new one in place
            path.rename(final)


def verify(folder: Path) -> dict:
    """The manifest of a complete checkpoint, or SftplugError naming what is wrong."""
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise SftplugError(f"{folder}: incomplete checkpoint ({MANIFEST} is missing)") from None
    except json.JSONDecodeError as exc:
        raise SftplugError(f"{manifest_path}: corrupt ({exc.msg})") from None
    if manifest.get("format") != FORMAT:
        raise SftplugError(f"{manifest_path}: not an sftplug checkpoint")
    for name, size in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise SftplugError(f"{folder}: incomplete checkpoint ({name} is missing)")
        if path.stat().st_size != size:
            raise SftplugError(f"{path}: truncated or altered ({path.stat().st_size} bytes, expected {size})")
    return manifest


def complete_checkpoints(out: str | Path) -> list[Path]:
    """Complete step-<N> folders of a run, newest first."""
    root = Path(out) / "checkpoints"
    found = []
    for path in root.glob("step-*"):
        suffix = path.name[len("step-") :]
        if suffix.isdigit():
            try:
                verify(path)
            except SftplugError:
                continue
            found.append((int(suffix), path))
    return [p for _, p in sorted(found, reverse=True)]


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a run folder, a checkpoints folder, `latest` or a step folder."""
    path = Path(path)
    for candidate in (path / "checkpoints" / LATEST, path / LATEST, path):
        if candidate.is_file() and candidate.name == LATEST:
            return candidate.parent / candidate.read_text().strip()
    return path


def is_checkpoint(path: str | Path) -> bool:
    folder = resolve(path)
    try:
        return json.loads((folder / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def load_weights(folder: Path) -> dict:
    """The saved weights by name, as full tensors (also from a sharded checkpoint)."""
    if (folder / SHARDS).is_dir():
        from sftplug.checkpoint.shards import read_full_weights

        return read_full_weights(folder / SHARDS)
    path = folder / WEIGHTS
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise SftplugError(f"{path}: cannot be read ({exc}); the file is corrupt") from None


def prune(out: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    for old in complete_checkpoints(out)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
