"""`sftplug train --config FILE` and `--print-config`: the file, the flags beside it, and OUT/config.yaml."""

import json

import pytest
import yaml
from click.testing import CliRunner

from sftplug.cli import cli
from sftplug.config import DEFAULT_EVAL, TrainConfig
from sftplug.config_file import KEYS, load_config

# A run of a few seconds: the 200 held-out records as training data, so no eval pass.
TINY = ["--steps", "3", "--seq-len", "64", "--micro-bsz", "2", "--model", "tiny", "--data", str(DEFAULT_EVAL)]


def invoke(*args):
    return CliRunner().invoke(cli, ["train", *map(str, args)])


@pytest.fixture
def captured(monkeypatch):
    """The TrainConfig and nproc `sftplug train` would run with, instead of running."""
    seen = {}

    def capture(config, registry, echo):
        seen["config"] = config
        raise SystemExit(0)

    def launch(nproc, args):
        seen["nproc"] = nproc

    monkeypatch.setattr("sftplug.train.loop.train", capture)
    monkeypatch.setattr("sftplug.cli.launch.launch", launch)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return seen


def test_flags_given_override_the_file_and_the_file_the_defaults(tmp_path, captured):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 30\nmicro-bsz: 4\nlora_targets: [qkv, o]\nlr: 1e-4\npack: false\n")
    result = invoke("--config", path, "--steps", 7, "--pack")
    assert result.exit_code == 0, result.output
    assert captured["config"] == TrainConfig(steps=7, micro_bsz=4, lora_targets=("qkv", "o"), lr=1e-4, pack=True)


def test_a_flag_given_at_its_default_value_still_wins(tmp_path, captured):
    path = tmp_path / "run.yaml"
    path.write_text(f"steps: 30\nout: {tmp_path / 'from-file'}\n")
    assert invoke("--config", path, "--steps", TrainConfig().steps, "--out", "runs/default").exit_code == 0
    assert (captured["config"].steps, captured["config"].out) == (TrainConfig().steps, "runs/default")


def test_nproc_from_the_file_unless_given_or_under_torchrun(tmp_path, captured, monkeypatch):
    path = tmp_path / "run.yaml"
    path.write_text("nproc: 3\nfull: true\nstrategy: fsdp\n")
    monkeypatch.setattr("sys.argv", ["sftplug", "train", "--config", str(path)])
    assert invoke("--config", path).exit_code == 0
    assert captured.pop("nproc") == 3 and "config" not in captured
    assert invoke("--config", path, "--nproc", 2).exit_code == 0
    assert captured.pop("nproc") == 2
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun started this process: the file's nproc starts none
    assert invoke("--config", path).exit_code == 0
    assert "nproc" not in captured and captured["config"].strategy == "fsdp"


@pytest.mark.parametrize(
    "text, message",
    [
        ("stpes: 3\n", "run.yaml: unknown key 'stpes'; did you mean 'steps'?"),
        ("steps: ten\n", "run.yaml, key 'steps': expected an integer, got \"ten\""),
        ("steps: 0\n", "run.yaml, key 'steps': --steps must be at least 1, got 0"),
        ("steps: [3\n", "run.yaml: not valid YAML: line 2, column 1:"),
    ],
)
def test_a_bad_config_exits_2_with_one_line(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(text)
    result = invoke("--config", "run.yaml", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.splitlines() == [result.output.strip()] and result.output.startswith(f"Error: {message}")
    assert not (tmp_path / "out").exists()


def test_a_missing_config_file_is_one_line(tmp_path):
    result = invoke("--config", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and result.output == f"Error: {tmp_path / 'nope.yaml'}: config file not found\n"


def test_print_config_shows_the_resolved_config_and_runs_nothing(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"steps: 30\nout: {tmp_path / 'out'}\nfield_map: q=prompt\n")
    result = invoke("--config", path, "--lr", "2e-4", "--print-config")
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert list(printed) == KEYS
    assert (printed["steps"], printed["lr"], printed["field_map"], printed["nproc"]) == (30, 2e-4, {"q": "prompt"}, 1)
    (tmp_path / "printed.yaml").write_text(result.output)
    expected = TrainConfig(steps=30, lr=2e-4, out=str(tmp_path / "out"), field_map={"q": "prompt"})
    assert load_config(tmp_path / "printed.yaml") == (expected, 1)
    assert not (tmp_path / "out").exists()  # nothing was run


def test_a_run_repeated_from_its_config_yaml_gives_the_same_losses(tmp_path):
    first = invoke("--out", tmp_path / "first", *TINY, "--lr", "1e-3", "--lora-targets", "qkv,down")
    assert first.exit_code == 0, first.output
    saved = tmp_path / "first" / "config.yaml"
    config, nproc = load_config(saved)
    assert nproc == 1
    assert config == TrainConfig(out=str(tmp_path / "first"), steps=3, seq_len=64, micro_bsz=2, model="tiny",
                                 data=str(DEFAULT_EVAL), lr=1e-3, lora_targets=("qkv", "down"))
    again = invoke("--config", saved, "--out", tmp_path / "again")
    assert again.exit_code == 0, again.output

    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses("first")) == 3 and losses("again") == losses("first")
    assert load_config(tmp_path / "again" / "config.yaml")[0] == TrainConfig(**{**config.to_dict(),
                                                                                "out": str(tmp_path / "again")})
