"""One run per folder, over time: a used --out is refused unless the run resumes it or starts over
(--overwrite moves the old files aside), and a run refused at once leaves --out as it found it."""

import hashlib
import json
import shutil

import pytest
from click.testing import CliRunner

from sftplug.cli import cli
from sftplug.config import DEFAULT_EVAL

# The bundled held-out file (200 records) as training data: tokenized in a moment.
SMALL = ["--steps", "2", "--micro-bsz", "2", "--seq-len", "64", "--log-every", "1", "--data", str(DEFAULT_EVAL),
         "--sample-prompt", "Hi"]


def train(out, *args):
    return CliRunner().invoke(cli, ["train", "--out", str(out), *SMALL, *args])


def snapshot(folder) -> dict:
    """Every path under ``folder``: a file's SHA-256, or "folder"."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


def steps_in_metrics(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def error_line(result) -> str:
    """The one line a refused run prints."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-update run, copied by each test that needs one."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = train(out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def used(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_a_second_run_on_a_used_folder_is_refused_before_writing_anything(used):
    before = snapshot(used)
    line = error_line(train(used, "--steps", "3"))
    assert line == (f"Error: --out {used} holds another run (config.yaml, metrics.jsonl, summary.json, checkpoints/); "
                    f"continue it with --resume auto, start over with --overwrite (its files move to "
                    f"{used / 'previous-<time>'}/), or choose another --out")
    assert snapshot(used) == before  # byte-identical: no lock holder, cache entry, config or metrics written


def test_resume_auto_continues_the_run_in_its_folder(used):
    result = train(used, "--steps", "3", "--resume", "auto")
    assert result.exit_code == 0, result.output
    assert f"resume: continuing from {used / 'checkpoints' / 'step-2'} at step 2" in result.output
    assert steps_in_metrics(used) == [1, 2, 3]
    assert sorted(p.name for p in (used / "checkpoints").glob("step-*")) == ["step-2", "step-3"]
    assert not list(used.glob("previous-*"))


def test_overwrite_moves_the_previous_run_aside_and_starts_over(used):
    before = snapshot(used)
    result = train(used, "--steps", "1", "--overwrite")
    assert result.exit_code == 0, result.output
    (previous,) = used.glob("previous-*")
    moved = "config.yaml, metrics.jsonl, summary.json, checkpoints"
    assert f"overwrite: moved the previous run's files ({moved}) to {previous}/" in result.output
    # every file of the previous run is there, unchanged; the lock and the data cache stayed in OUT
    kept = {name: digest for name, digest in before.items() if not name.startswith(("cache", "run.lock"))}
    assert snapshot(previous) == kept
    assert {k: v for k, v in snapshot(used).items() if k.startswith("cache")} == {
        k: v for k, v in before.items() if k.startswith("cache")}
    assert steps_in_metrics(used) == [1]
    assert [p.name for p in (used / "checkpoints").glob("step-*")] == ["step-1"]
    assert json.loads((used / "summary.json").read_text())["steps"] == 1


def test_overwrite_moves_nothing_when_the_run_is_refused(used):
    before = snapshot(used)
    line = error_line(train(used, "--overwrite", "--attention", "warp-drive"))
    assert "unknown attention backend 'warp-drive'" in line
    assert snapshot(used) == before


def bad_data(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    return path


@pytest.mark.parametrize("option, value, message", [
    ("--attention", "warp-drive", "unknown attention backend 'warp-drive'"),
    ("--fused", "rmsnorm=warp", "no fused form 'warp' of rmsnorm is offered"),
    ("--log-to", "mlflow", "--log-to mlflow: no plugin provides a logger of that name"),
    ("--model", "MISSING", "not a built-in preset, an HF checkpoint folder or an sftplug checkpoint"),
    ("--data", "MISSING", "data file not found"),
    ("--data", "BAD", "bad.jsonl:2: invalid JSON"),  # found while tokenizing, after the model loaded
])
def test_a_run_refused_at_once_leaves_no_folder_behind(tmp_path, option, value, message):
    value = {"MISSING": str(tmp_path / "missing"), "BAD": str(bad_data(tmp_path))}.get(value, value)
    out = tmp_path / "new" / "run"  # its parent is created too
    assert message in error_line(train(out, option, value))
    assert not (tmp_path / "new").exists()


def test_a_refused_run_leaves_an_existing_folder_as_it_was(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert "bad.jsonl:2: invalid JSON" in error_line(train(out, "--data", str(bad_data(tmp_path))))
    assert snapshot(out) == before  # no run.lock, no cache


def test_choices_are_refused_before_the_data_is_read_or_the_model_loaded(tmp_path):
    # The model does not exist and the data does not parse: the bad attention name is what is said.
    line = error_line(train(tmp_path / "run", "--attention", "warp-drive", "--model", str(tmp_path / "missing"),
                            "--data", str(bad_data(tmp_path))))
    assert "unknown attention backend 'warp-drive'" in line
    line = error_line(train(tmp_path / "run", "--optimizer", "paged_adamw", "--device", "cpu",
                            "--data", str(bad_data(tmp_path))))
    assert line.startswith("Error: --optimizer paged_adamw: paged optimizers page their state")
    assert not (tmp_path / "run").exists()
