"""Metrics loggers beside OUT/metrics.jsonl: the names of ``--log-to``, opened through the
``open_logger`` hook on rank 0, fed every record the core writes, closed at the end.

A logger is what a plugin's ``open_logger`` returns: an object with ``log(record)`` and
``close()`` (:class:`Logger`). The logger of a plugin carries the plugin's own name
(``--log-to tensorboard`` is the ``tensorboard`` plugin's).
"""

from __future__ import annotations

from pathlib import Path

from sftplug.errors import SftplugError


class Logger:
    """What ``open_logger`` returns. The run's config arrives once, when the logger is opened."""

    name = "logger"

    def log(self, record: dict) -> None:
        """One record, exactly as written to metrics.jsonl: an update's (step, loss, lr, grad_norm,
        tokens, tps, eval_loss when measured, ...), or step 0's held-out loss before training (step
        and eval_loss only). Do not modify it."""
        raise NotImplementedError

    def close(self) -> None:
        """The end of the run, also when it failed: flush and release what the logger holds."""


def logger_plugins(registry) -> list:
    """Every plugin that implements ``open_logger``, available here or not."""
    return [p for p in registry.plugins if "open_logger" in p.hooks]


def check_log_to(registry, names: tuple[str, ...]) -> None:
    """Refuse, in one line and before the run starts, a ``--log-to`` name no available plugin has."""
    loggers = {p.name for p in logger_plugins(registry)}
    for name in names:
        plugin = registry.info(name)
        if plugin is not None and not plugin.available:  # disabled plugins were never loaded: no hooks known
            raise SftplugError(f"--log-to {name}: the {name} logger is unavailable: {plugin.why_unavailable}")
        if name not in loggers:
            known = ", ".join(sorted(loggers)) or "none"
            raise SftplugError(f"--log-to {name}: no plugin provides a logger of that name; loggers: {known}")


def open_loggers(registry, config, out: Path, echo=print) -> list:
    """The loggers of ``config.log_to``, in that order, each opened with the run's config."""
    loggers = []
    try:
        for name in config.log_to:
            logger = registry.hook.open_logger(name=name, config=config, out=out)
            if logger is None:
                raise SftplugError(f"--log-to {name}: the {name} plugin opened no logger; see `sftplug plugins`")
            loggers.append(logger)
    except BaseException:
        close_loggers(loggers, echo)  # the ones already open, e.g. a W&B run
        raise
    return loggers


def close_loggers(loggers: list, echo) -> None:
    """Close every logger; one that fails to close is reported and does not stop the others."""
    for logger in loggers:
        try:
            logger.close()
        except Exception as exc:
            echo(f"logger {getattr(logger, 'name', type(logger).__name__)}: close failed: {type(exc).__name__}: {exc}")
