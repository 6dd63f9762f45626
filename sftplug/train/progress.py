"""How a run shows its updates: a live tqdm line when stderr is a terminal, else a plain line
every ``--log-every`` (what a log file wants). Rank 0 only, like the run's ``echo``."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """Use as a context manager around the update loop; print the loop's other lines with
    :meth:`echo` so they appear above the live line instead of breaking it."""

    def __init__(self, run, stream=None):
        self.run, self.config = run, run.config
        stream = stream if stream is not None else sys.stderr
        live = run.world.is_main and stream.isatty()
        self.bar = tqdm(total=self.config.steps, initial=run.step, file=stream, unit="upd", dynamic_ncols=True,
                        bar_format="step {n_fmt}/{total_fmt} |{bar}| {desc} [{elapsed}<{remaining}]",
                        ) if live else None  # fmt: skip
        self.restart()

    def restart(self) -> None:
        """The plain lines' ETA counts from here (a compiled run's first update compiles)."""
        self.started, self.first_step = time.perf_counter(), self.run.step

    def echo(self, *args, **kwargs) -> None:
        if self.bar is None:
            self.run.echo(*args, **kwargs)
            return
        with tqdm.external_write_mode():  # clears the live line, prints, draws it again
            self.run.echo(*args, **kwargs)

    def show(self, record: dict) -> None:
        """After each update: ``--profile``'s line, then the live line or every N updates a plain one."""
        if self.config.profile:
            mfu = f" | MFU {record['mfu']:.1%}" if "mfu" in record else ""
            self.echo(
                f"[profile] forward {record['fwd_ms']:.0f} ms  backward {record['bwd_ms']:.0f} ms  "
                f"optimizer {record['opt_ms']:.0f} ms | {record['tps']:,.0f} tok/s{mfu} | "
                f"{record['s_per_update']:.2f} s/upd{_expert_loads(record)}"
            )
        skipped = "  (skipped: inf/NaN grads)" if record.get("skipped") else ""
        if self.bar is not None:
            live = f"loss {record['loss']:.4f}  {record['tps']:,.0f} tok/s{skipped}"
            self.bar.set_description_str(live, refresh=False)
            self.bar.update(self.run.step - self.bar.n)
            return
        c, step = self.config, self.run.step
        if step % c.log_every == 0 or step == c.steps:
            done = step - self.first_step
            eta = (time.perf_counter() - self.started) / done * (c.steps - step) if done else 0.0
            self.echo(
                f"step {step:>{len(str(c.steps))}}/{c.steps}  loss {record['loss']:.4f}  "
                f"{_aux(record)}lr {record['lr']:.2e}  grad {record['grad_norm']:.2f}  | {record['tps']:,.0f} tok/s  "
                f"eta {eta:.0f}s{skipped}"
            )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def _aux(record: dict) -> str:
    """The experts' load-balancing loss, beside the loss (a model with experts)."""
    return f"aux {record['aux_loss']:.4f}  " if "aux_loss" in record else ""


def _expert_loads(record: dict) -> str:
    """The busiest and the idlest expert's load relative to the mean, for --profile (a model with experts)."""
    if "expert_load_max" not in record:
        return ""
    return f" | experts' load {record['expert_load_max']:.2f}x / {record['expert_load_min']:.2f}x the mean"
