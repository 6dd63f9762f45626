"""One run per folder, over time too: rank 0 claims OUT before any work, and gives it back
as it found it when the run fails to start.

:func:`claim` creates OUT and takes its lock (:mod:`sftplug.train.lock`); under the lock it
refuses an OUT that holds another run's files unless the run continues it (``--resume``)
or starts over (``--overwrite``: :func:`start_over` moves those files into
OUT/previous-<time>/ once the run has started; nothing is deleted). The data cache
(OUT/cache) is shared by the runs of a folder and stays where it is.
"""

from __future__ import annotations

import datetime
import shutil
from dataclasses import dataclass
from pathlib import Path

from sftplug.checkpoint.run_state import check_resumable, resume_folder
from sftplug.config import TrainConfig, check_output_dir
from sftplug.errors import SftplugError
from sftplug.train import lock

# What a run writes into OUT besides the lock and the data cache (tensorboard/ and wandb/: the
# built-in loggers'; plot.png: the end of `sftplug train`).
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "plot.png", "checkpoints", "tensorboard", "wandb")
CACHE = "cache"


def previous_run_files(out: Path) -> list[str]:
    """The names of the run files in ``out``, in :data:`RUN_FILES`' order."""
    return [name for name in RUN_FILES if (out / name).exists()]


@dataclass
class Claim:
    """OUT held by this run, and what it was before, to give it back on a failed start."""

    out: Path
    created: Path | None  # the outermost folder the claim created (OUT or a parent); None: OUT existed
    had_lock_file: bool
    cache_entries: set[str] | None  # OUT/cache's entries before; None: no cache folder

    def abandon(self) -> None:
        """Release OUT and remove what the failed start added: the lock file, new cache entries,
        and the folders it created."""
        lock.abandon(self.out)
        if self.created is not None:
            shutil.rmtree(self.out, ignore_errors=True)
            for folder in self.out.parents:  # the parents it created, unless something else went there
                if not folder.is_relative_to(self.created):
                    break
                try:
                    folder.rmdir()
                except OSError:
                    break
            return
        if not self.had_lock_file:  # a file system without locks keeps the file lock.abandon would remove
            (self.out / lock.LOCK_FILE).unlink(missing_ok=True)
        cache = self.out / CACHE
        if self.cache_entries is None:
            shutil.rmtree(cache, ignore_errors=True)
        elif cache.is_dir():
            for entry in cache.iterdir():
                if entry.name not in self.cache_entries:
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def claim(config: TrainConfig, echo=print) -> Claim:
    """Create OUT and hold its lock; refuse, before writing anything, an OUT that holds another run."""
    out = Path(config.out)
    created = _outermost_missing(out)
    out = check_output_dir(config.out)
    cache = out / CACHE
    before = Claim(out, created, (out / lock.LOCK_FILE).exists(),
                   {p.name for p in cache.iterdir()} if cache.is_dir() else None)
    try:
        lock.acquire(out, echo, check=lambda: check_folder(out, config))
    except BaseException:
        before.abandon()  # the lock is not held: this removes the folders the claim created
        raise
    if config.overwrite and config.resume:
        echo(f"note: --overwrite has no effect with --resume, which continues the run in {out}")
    return before


def check_folder(out: Path, config: TrainConfig) -> None:
    """Refuse an OUT that holds another run's files, unless this run resumes it (from a checkpoint
    whose settings it shares) or starts over."""
    if config.resume == "auto" and (folder := resume_folder("auto", out)) is not None:
        check_resumable(folder, config)
    found = previous_run_files(out)
    if not found or config.resume or config.overwrite:
        return
    shown = ", ".join(name + "/" if (out / name).is_dir() else name for name in found)
    raise SftplugError(f"--out {out} holds another run ({shown}); continue it with --resume auto, start over with "
                       f"--overwrite (its files move to {out / 'previous-<time>'}/), or choose another --out")


def start_over(out: Path, echo=print) -> Path | None:
    """``--overwrite``: move the previous run's files into OUT/previous-<time>/, and say so; None if none."""
    found = previous_run_files(out)
    if not found:
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder, n = out / f"previous-{stamp}", 1
    while folder.exists():
        folder, n = out / f"previous-{stamp}-{n}", n + 1
    folder.mkdir()
    for name in found:
        (out / name).rename(folder / name)
    echo(f"overwrite: moved the previous run's files ({', '.join(found)}) to {folder}/")
    return folder


def _outermost_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (``path`` itself or a parent), or None."""
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing = folder
    return missing
