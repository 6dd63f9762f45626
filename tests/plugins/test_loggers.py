"""Loggers as plugins (``--log-to``): TensorBoard and W&B built in, a third-party one through the
same hook; every record of metrics.jsonl reaches each of them, and bad names fail before training."""

import json
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from sftplug import hookimpl
from sftplug.cli import cli
from sftplug.errors import SftplugError
from sftplug.plugins.loggers import LoggerPlugin, TensorBoardLogger
from sftplug.registry import Registry, build_registry
from sftplug.train.loggers import Logger, check_log_to
from sftplug.train.loop import train


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def write_text_records(path, n):
    path.write_text("".join(json.dumps({"text": f"Counting to {k}: " + " ".join(map(str, range(k)))}) + "\n"
                            for k in range(2, n + 2)))
    return str(path)


@pytest.fixture
def tiny(small_config, tmp_path):
    """A 3-update run of the tiny model on plain-text records (no sample answers to generate),
    with a two-record held-out file for eval_loss."""
    files = dict(data=write_text_records(tmp_path / "train.jsonl", 40),
                 eval_data=write_text_records(tmp_path / "eval.jsonl", 2))
    return lambda **kw: small_config(**{"steps": 3, "warmup": 1, **files, **kw})


def test_tensorboard_has_one_scalar_per_metric_per_step_equal_to_metrics_jsonl(tiny, registry, quiet):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny(log_to=("tensorboard",), eval_every=2)
    train(config, registry, echo=quiet)
    records = metrics(config.out)
    updates = records[1:]  # after step 0's held-out loss
    events = EventAccumulator(str(Path(config.out) / "tensorboard"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in updates], rel=1e-6)  # stored as float32
    for key in ("lr", "grad_norm", "tps", "tokens"):
        assert [e.value for e in events.Scalars(key)] == pytest.approx([r[key] for r in updates], rel=1e-6)
    held_out = [(r["step"], pytest.approx(r["eval_loss"])) for r in records if "eval_loss" in r]
    assert [(e.step, e.value) for e in events.Scalars("eval_loss")] == held_out and len(held_out) == 3  # 0, 2, 3
    assert "step" not in events.Tags()["scalars"]
    (config_text,) = events.Tensors("config/text_summary")
    assert '"steps": 3' in config_text.tensor_proto.string_val[0].decode()


def wandb_records(path: Path):
    """The records of a .wandb file: LevelDB's log format (32 KiB blocks of chunks with a 7-byte
    header: crc, length, type) after W&B's 7-byte file header, each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, payload = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length, kind) == (0, 0):  # the zero padding at the end of a block
            pos += left
            continue
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def test_wandb_offline_run_holds_the_config_and_every_record(tiny, registry, monkeypatch, quiet):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    config = tiny(log_to=("wandb",))
    train(config, registry, echo=quiet)
    wandb.teardown()  # the run file is written by W&B's service process: wait for it, as at exit
    (run_file,) = Path(config.out).glob("wandb/offline-run-*/run-*.wandb")
    records = list(wandb_records(run_file))
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [0, 1, 2, 3]  # step 0: the held-out loss before training
    assert [(h.get("loss"), h.get("eval_loss")) for h in history] == [(r.get("loss"), r.get("eval_loss"))
                                                                      for r in metrics(config.out)]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    logged = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert logged["steps"] == 3 and logged["log_to"] == ["wandb"]
    assert run.project == "sftplug" and run.display_name == "run"  # the run folder's name


class MemoryLogger(Logger):
    name = "memory"

    def __init__(self, config, out, fail_at=None):
        self.config, self.out, self.fail_at = config, out, fail_at
        self.records, self.closed = [], 0

    def log(self, record):
        if record["step"] == self.fail_at:
            raise RuntimeError("the logger's server went away")
        self.records.append(dict(record))

    def close(self):
        self.closed += 1


class MemoryPlugin:
    def __init__(self, fail_at=None):
        self.opened, self.fail_at = [], fail_at

    @hookimpl
    def open_logger(self, name, config, out):
        if name != "memory":
            return None
        self.opened.append(MemoryLogger(config, out, self.fail_at))
        return self.opened[-1]


def registry_with(plugin, name="memory"):
    registry = build_registry(entrypoints=False)
    registry.add(name, lambda: plugin, source="test")
    return registry


def test_a_third_party_logger_gets_the_config_once_and_every_record(tiny, quiet):
    plugin = MemoryPlugin()
    config = tiny(log_to=("memory",), eval_every=3)
    train(config, registry_with(plugin), echo=quiet)
    (logger,) = plugin.opened
    assert logger.config is config and logger.out == Path(config.out)
    assert logger.records == metrics(config.out) and [r["step"] for r in logger.records] == [0, 1, 2, 3]
    assert "eval_loss" in logger.records[-1] and logger.closed == 1


def test_a_logger_is_closed_when_the_run_fails(tiny, quiet):
    plugin = MemoryPlugin(fail_at=2)
    with pytest.raises(RuntimeError, match="server went away"):
        train(tiny(log_to=("memory",)), registry_with(plugin), echo=quiet)
    (logger,) = plugin.opened
    assert [r["step"] for r in logger.records] == [0, 1] and logger.closed == 1


def one_line_error(*args, env=None):
    result = CliRunner().invoke(cli, ["train", "--steps", "1", *args], env=env)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_an_unknown_logger_name_lists_the_loggers_that_exist(tmp_path):
    line = one_line_error("--log-to", "tensorboard,mlflow", "--out", str(tmp_path / "run"))
    assert "--log-to mlflow" in line and "loggers: tensorboard, wandb" in line
    assert not (tmp_path / "run").exists()  # refused before the run started


def test_an_unavailable_logger_says_why(tmp_path):
    line = one_line_error("--log-to", "tensorboard", "--out", str(tmp_path / "run"),
                          env={"SFTPLUG_DISABLE_PLUGINS": "tensorboard"})
    assert "--log-to tensorboard" in line and "disabled by SFTPLUG_DISABLE_PLUGINS" in line
    assert not (tmp_path / "run").exists()


def test_a_logger_whose_package_is_missing_says_how_to_install_it():
    registry = Registry()
    registry.add("tensorboard", lambda: LoggerPlugin(TensorBoardLogger, "no_such_package_here", "tensorboard"))
    assert registry.info("tensorboard").hooks == ["open_logger"]
    with pytest.raises(SftplugError, match=r"pip install 'sftplug\[tensorboard\]'"):
        check_log_to(registry, ("tensorboard",))
    check_log_to(build_registry(entrypoints=False), ("tensorboard", "wandb"))  # both installed here
