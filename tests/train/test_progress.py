"""A run's progress: a live tqdm line when stderr is a terminal, plain lines every --log-every otherwise."""

import functools
import io
import json
import sys
from types import SimpleNamespace

from sftplug.config import TrainConfig
from sftplug.train.loop import train
from sftplug.train.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def fake_run(lines, steps=4, is_main=True, **config):
    config = TrainConfig(steps=steps, eval_data=None, **config)
    return SimpleNamespace(config=config, world=SimpleNamespace(is_main=is_main), step=0, echo=lines.append)


def record(step):
    return {"step": step, "loss": 2.0 / step, "lr": 1e-3, "grad_norm": 0.5, "tps": 1234.0, "fwd_ms": 1.0,
            "bwd_ms": 2.0, "opt_ms": 3.0, "s_per_update": 0.01}


def drive(run, stream):
    with Progress(run, stream) as progress:
        progress.echo("a line from the loop")
        for step in range(1, run.config.steps + 1):
            run.step = step
            progress.show(record(step))


def test_a_terminal_gets_a_live_line_and_the_other_lines_above_it():
    lines, terminal = [], Terminal()
    drive(fake_run(lines, log_every=1, profile=True), terminal)
    shown = terminal.getvalue()
    assert "\r" in shown and "step 4/4 |" in shown and "loss 0.5000  1,234 tok/s" in shown and "<00:00]" in shown
    assert lines[0] == "a line from the loop" and len(lines) == 5  # and the four --profile lines
    assert all(line.startswith("[profile] ") for line in lines[1:])  # no plain step lines


def test_elsewhere_plain_lines_every_log_every():
    lines, log = [], io.StringIO()
    drive(fake_run(lines, steps=5, log_every=2), log)
    assert log.getvalue() == ""
    assert [line.split("  loss")[0] for line in lines[1:]] == ["step 2/5", "step 4/5", "step 5/5"]
    assert lines[1].startswith("step 2/5  loss 1.0000  lr 1.00e-03  grad 0.50  | 1,234 tok/s  eta ")


def test_other_ranks_show_no_live_line():
    lines, terminal = [], Terminal()
    drive(fake_run(lines, is_main=False), terminal)
    assert terminal.getvalue() == ""


def test_a_training_on_a_terminal_shows_the_live_line(small_config, registry, monkeypatch, tmp_path):
    data = tmp_path / "text.jsonl"  # plain text: no sample answers to generate, a quicker run
    data.write_text("".join(json.dumps({"text": f"Counting to {k}: " + " ".join(map(str, range(k)))}) + "\n"
                            for k in range(2, 40)))
    small_config = functools.partial(small_config, data=str(data), steps=3, log_every=1)
    terminal, lines = Terminal(), []
    monkeypatch.setattr(sys, "stderr", terminal)
    train(small_config(), registry, echo=lines.append)
    assert "step 3/3 |" in terminal.getvalue() and "tok/s" in terminal.getvalue()
    assert not any(line.startswith("step ") for line in lines)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    lines.clear()
    train(small_config(out=str(tmp_path / "plain")), registry, echo=lines.append)
    assert [line.split("  loss")[0] for line in lines if line.startswith("step ")] == ["step 1/3", "step 2/3",
                                                                                        "step 3/3"]
