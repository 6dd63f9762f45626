"""One run per folder: OUT/run.lock is held for a run's life, refused to a second process, freed by death."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from sftplug.cli import cli
from sftplug.config import DEFAULT_EVAL
from sftplug.errors import SftplugError
from sftplug.train import lock

# Another process that takes OUT's lock through the module, says so, and holds it until told.
HOLDER = ("import sys; from pathlib import Path; from sftplug.train import lock; "
          "lock.acquire(Path(sys.argv[1])); print('held', flush=True); sys.stdin.readline()")
# Another process that tries to take OUT's lock and prints what happened.
TRY = ("import sys; from pathlib import Path; from sftplug.errors import SftplugError; from sftplug.train import lock\n"
       "try:\n    lock.acquire(Path(sys.argv[1])); print('taken')\nexcept SftplugError as exc:\n    print(exc)")


def start_holder(out):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def try_from_another_process(out) -> str:
    return subprocess.run([sys.executable, "-c", TRY, str(out)], capture_output=True, text=True, check=True).stdout


def holder_of(out) -> dict:
    return json.loads((out / lock.LOCK_FILE).read_text() or "{}")


@pytest.mark.slow
def test_a_held_lock_is_refused_naming_its_holder_and_a_clean_end_frees_it(tmp_path):
    holder = start_holder(tmp_path)
    before = (tmp_path / lock.LOCK_FILE).read_text()
    assert holder_of(tmp_path)["pid"] == holder.pid and holder_of(tmp_path)["host"] == socket.gethostname()
    notes = []
    with pytest.raises(SftplugError) as error:
        lock.acquire(tmp_path, notes.append)
    who = f"pid {holder.pid} on {socket.gethostname()}, started {holder_of(tmp_path)['started']}"
    expected = f"--out {tmp_path} is in use by another run ({who}); wait for it to end or choose another --out"
    assert str(error.value) == expected
    assert (tmp_path / lock.LOCK_FILE).read_text() == before and notes == []
    holder.communicate("\n")  # the holder exits normally: its lock is released and the file emptied
    assert holder.returncode == 0 and (tmp_path / lock.LOCK_FILE).read_text() == ""
    lock.acquire(tmp_path, notes.append)
    try:
        assert notes == [] and holder_of(tmp_path)["pid"] == os.getpid()
    finally:
        lock.release(tmp_path)
    assert (tmp_path / lock.LOCK_FILE).read_text() == ""


@pytest.mark.slow
def test_the_lock_of_a_killed_run_is_taken_over_with_a_note(tmp_path):
    holder = start_holder(tmp_path)
    left = holder_of(tmp_path)
    holder.kill()  # SIGKILL: no clean-up ran, the file still names it, but the kernel dropped the flock
    holder.wait()
    notes = []
    lock.acquire(tmp_path, notes.append)
    try:
        assert notes == [f"note: {tmp_path / lock.LOCK_FILE} was left by a run that did not end cleanly "
                         f"(pid {holder.pid} on {left['host']}, started {left['started']}); taking it over"]
        assert holder_of(tmp_path)["pid"] == os.getpid()
    finally:
        lock.release(tmp_path)


@pytest.mark.slow
def test_one_process_may_build_several_runs_on_its_folder_and_frees_it_after_the_last(tmp_path):
    lock.acquire(tmp_path)
    lock.acquire(tmp_path)  # e.g. a test resuming a run it built itself
    lock.release(tmp_path)
    refused = try_from_another_process(tmp_path)
    assert refused.startswith(f"--out {tmp_path} is in use by another run (pid {os.getpid()} ")
    lock.release(tmp_path)
    assert try_from_another_process(tmp_path) == "taken\n"


def test_a_file_system_without_locks_is_a_note_not_an_error(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    notes = []
    lock.acquire(tmp_path, notes.append)
    assert notes == [f"note: cannot lock {tmp_path / lock.LOCK_FILE} ({os.strerror(errno.ENOLCK)}); another run on "
                     f"--out {tmp_path} would not be noticed"]
    assert tmp_path.resolve() not in lock._held


def tree(folder) -> dict:
    """Every path under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_a_second_run_on_one_folder_is_refused_while_the_first_finishes_untouched(tmp_path):
    out = tmp_path / "run"
    tiny = ["--out", str(out), "--steps", "3", "--seq-len", "64", "--micro-bsz", "2", "--data", str(DEFAULT_EVAL)]
    first = subprocess.Popen([sys.executable, "-m", "sftplug", "train", *tiny], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / lock.LOCK_FILE).is_file() and holder_of(out).get("pid") == first.pid):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # frozen while it holds the lock: the second run surely meets it
        assert holder_of(out)["pid"] == first.pid
        before = tree(out)
        second = CliRunner().invoke(cli, ["train", *tiny, "--steps", "5"])
        assert second.exit_code == 2
        assert second.output.startswith(f"Error: --out {out} is in use by another run (pid {first.pid} on ")
        assert len(second.output.splitlines()) == 1
        assert tree(out) == before  # no cache, config.yaml, metrics or checkpoint of its own
    finally:
        first.send_signal(signal.SIGCONT)
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 0, output
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-3"
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert "steps: 3\n" in (out / "config.yaml").read_text()
    assert (out / lock.LOCK_FILE).read_text() == ""  # released at the end


@pytest.mark.slow
def test_a_run_that_fails_to_start_leaves_its_folder_free(tmp_path, registry):
    from sftplug.config import TrainConfig
    from sftplug.train.setup import build_run

    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(SftplugError):
        build_run(TrainConfig(model=str(tmp_path / "no-such-model"), out=str(out)), registry)
    assert list(out.iterdir()) == []  # the lock file it created is gone again
    assert try_from_another_process(out) == "taken\n"


@pytest.mark.slow
def test_a_failed_start_puts_back_the_lock_file_of_a_killed_run(tmp_path, registry):
    from sftplug.config import TrainConfig
    from sftplug.train.setup import build_run

    holder = start_holder(tmp_path)
    holder.kill()
    holder.wait()
    left = (tmp_path / lock.LOCK_FILE).read_bytes()
    with pytest.raises(SftplugError):
        build_run(TrainConfig(model=str(tmp_path / "no-such-model"), out=str(tmp_path)), registry, echo=print)
    assert (tmp_path / lock.LOCK_FILE).read_bytes() == left
    next_run = try_from_another_process(tmp_path)  # still hears of the killed run, not of the failed start
    assert f"did not end cleanly (pid {holder.pid} on " in next_run and next_run.endswith("taken\n")


def test_a_failed_check_leaves_the_lock_file_as_it_was(tmp_path):
    def refuse():
        raise SftplugError("no")

    with pytest.raises(SftplugError):
        lock.acquire(tmp_path, check=refuse)
    assert list(tmp_path.iterdir()) == []  # the file it created is removed
    (tmp_path / lock.LOCK_FILE).write_text("{}")
    with pytest.raises(SftplugError):
        lock.acquire(tmp_path, check=refuse)
    assert (tmp_path / lock.LOCK_FILE).read_text() == "{}" and tmp_path.resolve() not in lock._held
