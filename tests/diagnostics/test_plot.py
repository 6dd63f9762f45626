"""`sftplug plot`: a real PNG of loss, eval loss, learning rate, grad norm and tok/s, runs overlaid."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from sftplug.cli import cli
from sftplug.diagnostics import plot
from sftplug.errors import SftplugError

image = pytest.importorskip("matplotlib.image")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's C0 and C1, the first two runs


def write_run(folder, steps=40, speed=1.0, eval_every=10):
    """A run folder whose metrics.jsonl looks like a training's (loss falling at ``speed``)."""
    folder.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 2 + 5 * math.exp(-speed * step / 10), "lr": 3e-3 * min(1, step / 5),
                  "grad_norm": 1 + math.sin(step), "tokens": 128, "tps": 2000 + 50 * math.cos(step * speed)}
        if step % eval_every == 0:
            record["eval_loss"] = record["loss"] + 0.3
        lines.append(json.dumps(record))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def pixels(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return (image.imread(path)[..., :3] * 255).round().astype(np.uint8)


def has_colour(rgb, colour, tolerance=8):
    return bool((np.abs(rgb.astype(int) - colour).max(axis=-1) <= tolerance).sum() > 50)


def test_the_plot_is_a_png_of_real_content_that_follows_the_data(tmp_path):
    fast, slow = write_run(tmp_path / "fast"), write_run(tmp_path / "slow", speed=0.3)
    a = pixels(plot.plot_runs([fast], tmp_path / "a.png"))
    b = pixels(plot.plot_runs([slow], tmp_path / "b.png"))
    assert a.shape == (700, 1100, 3)  # 11 x 7 inches at 100 dpi
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 100  # lines, text, markers: not a blank canvas
    assert has_colour(a, BLUE) and not has_colour(a, ORANGE)
    assert (a != b).any(axis=-1).sum() > 1000  # other data, another picture
    again = pixels(plot.plot_runs([fast], tmp_path / "again.png"))
    assert (again == a).all()


def test_several_runs_are_overlaid_in_their_own_colours(tmp_path):
    fast, slow = write_run(tmp_path / "fast"), write_run(tmp_path / "slow", speed=0.3)
    both = pixels(plot.plot_runs([fast, slow], tmp_path / "both.png"))
    assert has_colour(both, BLUE) and has_colour(both, ORANGE)
    assert plot.labels([fast, slow]) == ["fast", "slow"]
    assert plot.labels([tmp_path / "a" / "run", tmp_path / "b" / "run"]) == [str(tmp_path / "a" / "run"),
                                                                             str(tmp_path / "b" / "run")]


def test_read_metrics_keeps_the_last_record_of_a_step_and_skips_a_cut_last_line(tmp_path):
    run = write_run(tmp_path / "run", steps=3)
    with open(run / "metrics.jsonl", "a") as f:  # resumed from step 1, then killed mid-line
        f.write(json.dumps({"step": 2, "loss": 9.0, "lr": 1e-3, "grad_norm": 1.0, "tps": 10}) + "\n")
        f.write('{"step": 3, "lo')
    records = plot.read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3] and records[1]["loss"] == 9.0
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(SftplugError, match=r"metrics.jsonl:2: not a JSON record"):
        plot.read_metrics(run)


def test_plot_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    one = runner.invoke(cli, ["plot", str(write_run(tmp_path / "a"))])
    assert one.exit_code == 0, one.output
    assert one.output == f"plot: {tmp_path / 'a' / 'plot.png'}\n" and (tmp_path / "a" / "plot.png").is_file()
    write_run(tmp_path / "b")
    several = runner.invoke(cli, ["plot", "a", "b"])
    assert several.exit_code == 2 and "--out FILE" in several.output and len(several.output.splitlines()) == 1
    several = runner.invoke(cli, ["plot", "a", "b", "--out", "cmp/both.png"])
    assert several.exit_code == 0 and pixels(tmp_path / "cmp" / "both.png").size
    (tmp_path / "empty").mkdir()
    missing = runner.invoke(cli, ["plot", "a", "empty", "--out", "x.png"])
    assert missing.exit_code == 2 and missing.output.count("\n") == 1, missing.output
    assert "empty: no metrics.jsonl here" in missing.output and not (tmp_path / "x.png").exists()


def test_the_end_of_a_run_names_its_plot_or_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv("SFTPLUG_NO_PLOT")  # the suite's conftest turns the plot off for other tests
    run = write_run(tmp_path / "run")
    assert plot.plot_after_run(run) == f"plot: {run / 'plot.png'}" and (run / "plot.png").is_file()
    monkeypatch.setattr(plot.probes, "module_available", lambda name: False)  # matplotlib missing
    assert plot.plot_after_run(run) == f"plot: pip install 'sftplug[plot]', then sftplug plot {run}"
    with pytest.raises(SftplugError, match=r"plots need matplotlib: pip install 'sftplug\[plot\]'"):
        plot.plot_runs([run], tmp_path / "x.png")
    monkeypatch.setenv("SFTPLUG_NO_PLOT", "1")
    assert plot.plot_after_run(run) is None


def test_sftplug_train_ends_with_where_its_plot_is(tmp_path, monkeypatch):
    monkeypatch.delenv("SFTPLUG_NO_PLOT")  # the suite's conftest turns the plot off for other tests
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"Count to {n}: " + ", ".join(map(str, range(n)))}) + "\n"
                            for n in range(2, 12)))
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--steps", "2", "--seq-len", "64",
                                      "--micro-bsz", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == f"plot: {out / 'plot.png'}"
    assert pixels(out / "plot.png").shape == (700, 1100, 3)


def panel_pixels(fig, ax):
    """The RGB pixels inside ``ax`` of the drawn figure."""
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    box = ax.get_window_extent()
    return rgb[rgb.shape[0] - int(box.y1):rgb.shape[0] - int(box.y0), int(box.x0):int(box.x1)]


def test_held_out_loss_is_drawn_as_points_at_its_steps(tmp_path):
    run = write_run(tmp_path / "run", steps=80, eval_every=20)
    held_out = {0: 7.5, 20: 4.1, 40: 2.9, 60: 2.5, 80: 2.4}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = [{"step": 0, "eval_loss": held_out[0]}] + [
        {**r, "eval_loss": held_out[r["step"]]} if "eval_loss" in r else r for r in records]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = {line.get_label(): line for line in plot.draw_runs([run]).axes[0].get_lines()}
    points = lines["run held-out"]
    assert points.get_marker() == "o" and points.get_linestyle() == "None"  # points, no line between them
    assert list(points.get_xdata()) == list(held_out) and list(points.get_ydata()) == list(held_out.values())
    loss = lines["run"]
    assert list(loss.get_xdata()) == list(range(1, 81)) and loss.get_marker() == "None"  # 80 points: a plain line


def test_a_run_of_one_update_shows_in_every_panel(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    update = {"step": 1, "loss": 6.9, "lr": 3e-4, "grad_norm": 2.5, "tokens": 2048, "tps": 900.0, "eval_loss": 6.7}
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_loss": 6.97}) + "\n" + json.dumps(update) + "\n")
    fig = plot.draw_runs([run])
    for (key, _), ax in zip(plot.PANELS, fig.axes):
        line = next(line for line in ax.get_lines() if line.get_label() == "run")
        assert list(line.get_xdata()) == [1] and list(line.get_ydata()) == [update[key]]
        assert line.get_marker() not in ("None", None, "") and line.get_markersize() > 0
    for ax in fig.axes[1:]:  # no legend there: blue pixels are the one update's marker
        assert (np.abs(panel_pixels(fig, ax).astype(int) - BLUE).max(axis=-1) <= 8).sum() >= 9
    held_out = next(line for line in fig.axes[0].get_lines() if line.get_label() == "run held-out")
    assert list(held_out.get_xdata()) == [0, 1] and list(held_out.get_ydata()) == [6.97, 6.7]
