"""Built-in metrics loggers: TensorBoard event files and Weights & Biases runs (``--log-to``).

Each is an optional extra; its package is imported only when a run opens the logger.
"""

from __future__ import annotations

import json
import os
from numbers import Real

from sftplug import hookimpl, probes
from sftplug.train.loggers import Logger


def scalars(record: dict) -> dict[str, float]:
    """The numeric metrics of a record (flags such as ``skipped`` and the step itself left out)."""
    return {k: v for k, v in record.items() if isinstance(v, Real) and not isinstance(v, bool) and k != "step"}


class TensorBoardLogger(Logger):
    """Event files under OUT/tensorboard/: one scalar per numeric metric per step, the config as text."""

    name = "tensorboard"

    def __init__(self, config, out):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        # TensorBoard renders text as markdown: a fenced block keeps the JSON readable
        self.writer.add_text("config", "```\n" + json.dumps(config.to_dict(), indent=2) + "\n```")

    def log(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Logger):
    """A W&B run in OUT/wandb/; W&B's own environment variables (WANDB_MODE=offline,
    WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME, ...) decide where it goes."""

    name = "wandb"

    def __init__(self, config, out):
        import wandb

        self.run = wandb.init(dir=str(out), config=config.to_dict(),
                              project=os.environ.get("WANDB_PROJECT", "sftplug"),
                              name=os.environ.get("WANDB_NAME", out.name))

    def log(self, record: dict) -> None:
        self.run.log(record, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class LoggerPlugin:
    """The plugin of one logger class: available when its package is installed."""

    def __init__(self, logger: type[Logger], package: str, extra: str):
        self.logger, self.package, self.extra = logger, package, extra

    def why_unavailable(self) -> str | None:
        if probes.module_available(self.package):
            return None
        return f"the {self.package} package is not installed: pip install 'sftplug[{self.extra}]'"

    @hookimpl
    def open_logger(self, name, config, out):
        return self.logger(config, out) if name == self.logger.name else None


tensorboard = LoggerPlugin(TensorBoardLogger, "tensorboard", "tensorboard")
wandb = LoggerPlugin(WandbLogger, "wandb", "wandb")
