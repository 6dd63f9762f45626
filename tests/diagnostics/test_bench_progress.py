"""`sftplug bench step` and `bench attention` report each side / backend as soon as it is done,
not all at the end: every report comes before the next one starts."""

import json

from click.testing import CliRunner

from sftplug.cli import cli
from sftplug.diagnostics import attention_bench, step_bench


def test_bench_step_reports_each_side_before_the_next_starts(monkeypatch):
    events = []

    def side(name, *args):
        events.append(f"run {name}")
        return step_bench.SideResult(name, 100.0, 1.0, 2.0, 0.5, 10.0)

    monkeypatch.setattr(step_bench, "run_side_in_child", side)
    step_bench.bench_step("W0", rounds=2, variants=("workers2",), echo=lambda line: events.append(line))
    order = ["sftplug", "sftplug+workers2", "hf+peft"]
    expected = []
    for r, sides in ((1, order), (2, order[::-1])):  # rounds alternate the order
        for name in sides:
            expected += [f"run {name}", f"round {r}/2 {name}: 100 tok/s, peak 10 MiB"]
    assert events == expected


def test_bench_step_command_prints_the_side_lines_on_stderr(monkeypatch):
    monkeypatch.setattr(step_bench, "run_side_in_child",
                        lambda name, *a: f"{name} failed: boom" if name == "hf+peft" else
                        step_bench.SideResult(name, 100.0, 1.0, 2.0, 0.5, 10.0))
    result = CliRunner().invoke(cli, ["bench", "step", "--rounds", "1", "--json"])
    assert result.exit_code == 1, result.output  # a side failed: a script must not read the ratios as good
    assert result.stderr.splitlines() == ["round 1/1 sftplug: 100 tok/s, peak 10 MiB",
                                          "round 1/1 hf+peft: hf+peft failed: boom"]
    assert json.loads(result.stdout)["errors"] == {"hf+peft": "hf+peft failed: boom"}


def test_bench_attention_reports_each_row_before_timing_the_next(registry, monkeypatch):
    events, real = [], attention_bench._time_backend

    def timed(backend, *args):
        events.append(f"time {backend.name}")
        return real(backend, *args)

    monkeypatch.setattr(attention_bench, "_time_backend", timed)
    rows = attention_bench.run_attention_bench(registry, shapes=[(1, 2, 32, 16)], dtypes=["fp32"], device="cpu",
                                               repeats=1, packed=False,
                                               echo=lambda row: events.append(f"row {row['backend']}"))
    offered = [r for r in rows if not r["status"].startswith("skipped: unavailable here")]
    expected = []
    for r in offered:
        expected += ([f"time {r['backend']}"] if r["status"] == "ok" else []) + [f"row {r['backend']}"]
    assert events == expected and sum(r["status"] == "ok" for r in offered) >= 2


def test_bench_attention_command_prints_every_row_on_stderr_also_with_json():
    result = CliRunner().invoke(cli, ["bench", "attention", "--json", "--device", "cpu", "--shape", "1,2,32,16",
                                      "--repeats", "1", "--no-packed"])
    assert result.exit_code == 0, result.output
    rows = [r for r in json.loads(result.stdout) if not r["status"].startswith("skipped: unavailable here")]
    lines = result.stderr.splitlines()
    assert [line.split(":")[0].strip() for line in lines] == [f"{r['backend']} fp32 B1 H2 S32 D16" for r in rows]
    for line, r in zip(lines, rows):
        assert line.endswith(" ms") if r["status"] == "ok" else line.endswith(r["status"])
