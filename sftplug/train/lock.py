"""One run per folder: a run holds an exclusive ``flock`` on OUT/run.lock for its whole life.

The kernel drops the lock when its process dies, so a lock nobody holds is free, whatever
the file says. The file holds the holder's pid, host and start time as JSON, for the
message a second run gets; a run that ends cleanly empties it, so finding it filled
means the run before was killed and its lock is taken over with a note.

The lock belongs to a process: building a second run on the same OUT in the process that
holds it (tests, benchmarks) shares it, and it is released when the last of them ends,
or when the process exits. A run that fails to start gives it back with :func:`abandon`,
which leaves the file as :func:`acquire` found it.
"""

from __future__ import annotations

import atexit
import datetime
import errno
import fcntl
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from sftplug.errors import SftplugError

LOCK_FILE = "run.lock"


@dataclass
class _Held:
    fd: int
    pid: int  # the process that took it: a forked DataLoader worker must not release it
    found: bytes | None  # the file's bytes when it was taken; None: this process created it
    count: int = 1


_held: dict[Path, _Held] = {}


def acquire(out: Path, echo=print, check=None) -> None:
    """Hold OUT's lock, or raise a one-line SftplugError naming the run that holds it.

    ``check()`` runs once the lock is held, before anything is written: an error it raises
    gives the lock back and leaves the file as it was. Nothing is written into OUT unless
    the lock is taken.
    """
    key = Path(out).resolve()
    if key in _held:
        if check is not None:
            check()
        _held[key].count += 1
        return
    path = Path(out) / LOCK_FILE
    while True:
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd)) or "a run that is just starting or ending"
            os.close(fd)
            raise SftplugError(f"--out {out} is in use by another run ({holder}); wait for it to end or choose "
                               "another --out") from None
        except OSError as exc:  # a file system without locks (some network mounts)
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            _checked(check, path if created else None)
            echo(f"note: cannot lock {path} ({exc.strerror}); another run on --out {out} would not be noticed")
            return
        if _same_file(fd, path):
            break
        os.close(fd)  # a run that failed to start removed the file it had created: lock the new one
    found = None if created else os.pread(fd, 4096, 0)
    try:
        _checked(check, path if created else None)
    except BaseException:
        os.close(fd)
        raise
    previous = _describe(_read(fd))
    if previous:
        echo(f"note: {path} was left by a run that did not end cleanly ({previous}); taking it over")
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode(), 0)
    _held[key] = _Held(fd, os.getpid(), found)


def release(out: Path) -> None:
    """Let go of OUT's lock (when the last run of this process on OUT ends); no-op if not held."""
    held = _last_release(out)
    if held is not None:
        os.ftruncate(held.fd, 0)  # empty: this run ended cleanly
        os.close(held.fd)  # closing drops the flock


def abandon(out: Path) -> None:
    """Let go of OUT's lock and leave its file as :func:`acquire` found it (a run that failed to start)."""
    held = _last_release(out)
    if held is not None:
        if held.found is None:  # removed while still locked: a run waiting for it locks a new file
            (Path(out) / LOCK_FILE).unlink(missing_ok=True)
        else:
            os.ftruncate(held.fd, 0)
            os.pwrite(held.fd, held.found, 0)
        os.close(held.fd)


def _last_release(out: Path) -> _Held | None:
    """Count one run of this process off OUT's lock; the lock when that was the last run, else None."""
    key = Path(out).resolve()
    held = _held.get(key)
    if held is None or held.pid != os.getpid():
        return None
    held.count -= 1
    if held.count:
        return None
    del _held[key]
    return held


def _checked(check, created: Path | None) -> None:
    """Run ``check``; if it raises, remove the lock file this process ``created``."""
    if check is None:
        return
    try:
        check()
    except BaseException:
        if created is not None:
            created.unlink(missing_ok=True)
        raise


def _same_file(fd: int, path: Path) -> bool:
    """Whether the locked ``fd`` is still the file at ``path`` (not one removed meanwhile)."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


@atexit.register
def _release_all() -> None:
    for out in list(_held):
        _held[out].count = 1
        release(out)


def _read(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # half written by a run killed while taking the lock
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return ""
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
