"""`sftplug plot`: one PNG of a run's metrics.jsonl (several runs overlaid) against the step.

Panels: loss (held-out loss as hollow points), learning rate, gradient norm, tokens/s. Lines of
few points carry a dot per point, so a run of one update shows. matplotlib is an optional extra,
imported only here, drawn with the Agg canvas (no window, no global backend).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sftplug import probes
from sftplug.errors import SftplugError

INSTALL = "pip install 'sftplug[plot]'"
# (record key, panel title); loss also shows eval_loss
PANELS = [("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"), ("tps", "tokens/s")]
# runs of a model with experts: the busiest and the idlest expert's load (records' expert_load_max, _min)
EXPERTS_PANEL = ("expert_load_max", "experts' load / mean: busiest (solid), idlest (dashed)")
DOTTED_UP_TO = 50  # points of a line drawn with a dot each; more would blur into the line


def matplotlib_missing() -> str | None:
    """Why plots cannot be drawn here (one line, with the install command), or None."""
    return None if probes.module_available("matplotlib") else f"plots need matplotlib: {INSTALL}"


def read_metrics(folder: str | Path) -> list[dict]:
    """A run's records by step; a resumed run's repeated steps keep the record written last.

    A last line cut short (a killed run) is left out; any other bad line is an error.
    """
    path = Path(folder) / "metrics.jsonl"
    if not path.is_file():
        raise SftplugError(f"{folder}: no metrics.jsonl here; give the folder of a run (sftplug train --out)")
    lines = path.read_text().splitlines()
    by_step = {}
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise SftplugError(f"{path}:{number}: not a JSON record; fix or remove the line") from None
        by_step[record["step"]] = record
    if not by_step:
        raise SftplugError(f"{path}: no records yet; plot the run after its first update")
    return [by_step[step] for step in sorted(by_step)]


def labels(folders: list[Path]) -> list[str]:
    """The legend's names: each folder's name, or the path as given where names repeat."""
    names = [Path(f).resolve().name for f in folders]
    return [name if names.count(name) == 1 else str(f) for name, f in zip(names, folders)]


def plot_runs(folders: list[str | Path], out_file: str | Path | None = None) -> Path:
    """Draw the runs of ``folders`` into the PNG ``out_file`` (for one run FOLDER/plot.png by default)."""
    if out_file is None and len(folders) > 1:
        raise SftplugError(f"{len(folders)} runs: name the image to write with --out FILE, e.g. --out compare.png")
    out_file = Path(out_file or Path(folders[0]) / "plot.png")
    fig = draw_runs(folders)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_file, dpi=100)
    return out_file


def draw_runs(folders: list[str | Path]):
    """The matplotlib Figure of the runs of ``folders`` (:func:`plot_runs` saves it)."""
    reason = matplotlib_missing()
    if reason:
        raise SftplugError(reason)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    runs = [read_metrics(f) for f in folders]  # every folder checked before anything is drawn
    panels = PANELS + ([EXPERTS_PANEL] if any("expert_load_max" in r for rs in runs for r in rs) else [])
    fig = Figure(figsize=(11, 7 if len(panels) <= 4 else 10), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots((len(panels) + 1) // 2, 2, sharex=True).flat)
    for (key, title), ax in zip(panels, axes):
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        for n, (records, label) in enumerate(zip(runs, labels([Path(f) for f in folders]))):
            color = f"C{n % 10}"
            steps = [r["step"] for r in records if key in r]
            ax.plot(steps, [r[key] for r in records if key in r], color=color, label=label, linewidth=1.2,
                    marker="o" if len(steps) <= DOTTED_UP_TO else None, markersize=3)
            if key == "expert_load_max":
                idle = [r for r in records if "expert_load_min" in r]
                ax.plot([r["step"] for r in idle], [r["expert_load_min"] for r in idle], "--", color=color,
                        linewidth=1.2, marker="o" if len(idle) <= DOTTED_UP_TO else None, markersize=3)
            if key == "loss":
                evals = [r for r in records if r.get("eval_loss") is not None]
                if evals:  # before, after and every --eval-every; none without held-out data
                    ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o", color=color,
                            markerfacecolor="white", markersize=6, label=f"{label} held-out")
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in axes[len(panels):]:  # an odd number of panels leaves one cell empty
        ax.set_visible(False)
    for ax in axes[len(panels) - 2:len(panels)]:  # the bottom of each column
        ax.set_xlabel("step")
        ax.xaxis.set_tick_params(labelbottom=True)
    fig.axes[0].legend(fontsize="small")
    return fig


def plot_after_run(out: str | Path) -> str | None:
    """The line ``sftplug train`` ends with: where the run's plot is, or how to get one.

    SFTPLUG_NO_PLOT=1 skips it (None): drawing costs about a second, which test suites
    running many short trainings do not want.
    """
    if os.environ.get("SFTPLUG_NO_PLOT", "") in ("1", "true", "yes"):
        return None
    if matplotlib_missing():
        return f"plot: {INSTALL}, then sftplug plot {out}"
    return f"plot: {plot_runs([out])}"
