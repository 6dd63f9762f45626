"""What every sftplug command shares: help options, user errors as one line (exit 2), and
``sftplug train``'s options generated from :class:`~sftplug.config.TrainConfig`."""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import click
from click.core import ParameterSource

from sftplug.config import GROUPS, TrainConfig, flag
from sftplug.config_file import comma_list, load_config
from sftplug.errors import SftplugError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class UserError(click.ClickException):
    exit_code = 2


class PeerFailed(click.ClickException):
    exit_code = 1


def user_errors(fn):
    """Turn SftplugError into one clear line and exit code 2, no traceback.

    Under torchrun the line names the process, and a process whose collective broke because
    another one died says so in one line instead of a traceback of its own.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SftplugError as exc:
            raise UserError(_process_prefix() + str(exc)) from None
        except RuntimeError as exc:
            if not (_process_prefix() and _collective_broke(exc)):
                raise
            text = str(exc).strip() or type(exc).__name__
            first_line = re.sub(r"^\[[^\]]*\] ", "", text.splitlines()[0])  # drop gloo's source location
            raise PeerFailed(f"{_process_prefix()}stopped: another process of this run failed ({first_line})") from None

    return wrapper


def _process_prefix() -> str:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return f"process {os.environ.get('RANK', '0')} of {size}: " if size > 1 else ""


def _collective_broke(exc: RuntimeError) -> bool:
    import torch.distributed as dist

    # NCCL raises DistError subclasses; gloo a plain RuntimeError from its transport
    return isinstance(exc, dist.DistError) or "gloo" in str(exc)


# -- TrainConfig as click options ----------------------------------------------------------


def config_option(f: dataclasses.Field):
    """The click option of one TrainConfig field, from the field's default and metadata.

    Types are parsed here; values are checked by TrainConfig itself (one place, one message),
    so choices are shown in the help but not enforced by click.
    """
    meta, default = f.metadata, f.default
    kwargs = dict(help=meta["help"], show_default=meta["shown_default"] or default not in (None, ()))
    if isinstance(default, bool):  # on by default: --x/--no-x; off: the flag --x
        if default:
            return click.option(f"{flag(f.name)}/--no-{flag(f.name)[2:]}", f.name, default=True, **kwargs)
        return click.option(flag(f.name), f.name, is_flag=True, default=False, help=meta["help"])
    if isinstance(default, tuple):  # comma-separated on the command line; ", " lets help wrap between names
        default = ", ".join(default)
    elif meta["choices"]:
        kwargs["metavar"] = "[" + "|".join(meta["choices"]) + "]"
    kind = type(default) if isinstance(default, (int, float)) else str
    return click.option(flag(f.name), f.name, type=kind, default=default, **kwargs)


def config_options(fn):
    """Every TrainConfig field as an option of ``fn``, in the dataclass's order."""
    for f in reversed(dataclasses.fields(TrainConfig)):
        fn = config_option(f)(fn)
    return fn


def config_from_options(options: dict, config_file: str | None = None,
                        given: set[str] = frozenset()) -> tuple[TrainConfig, int | None]:
    """The TrainConfig of a command's parsed options (comma lists split), and a config file's nproc.

    With ``config_file``, the options named in ``given`` (those on the command line) override
    the file, and the file overrides the defaults.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in options.items() if k in names}
    for f in dataclasses.fields(TrainConfig):
        if isinstance(f.default, tuple) and isinstance(values.get(f.name), str):  # comma lists
            values[f.name] = comma_list(values[f.name])
    if config_file is None:
        return TrainConfig(**values), None
    return load_config(config_file, overrides={k: v for k, v in values.items() if k in given})


def given_options(ctx: click.Context) -> set[str]:
    """The names of the options given on the command line (not left at their defaults)."""
    defaults = (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    return {p.name for p in ctx.command.params if ctx.get_parameter_source(p.name) not in defaults}


class GroupedCommand(click.Command):
    """A command whose help lists TrainConfig's options under their groups."""

    def format_options(self, ctx, formatter):
        group_of = {f.name: f.metadata["group"] for f in dataclasses.fields(TrainConfig)}
        sections: dict[str, list] = {g: [] for g in GROUPS}
        other = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                (sections[group_of[param.name]] if param.name in group_of else other).append(record)
        for group, records in sections.items():
            if records:
                with formatter.section(f"{GROUPS[group]} options"):
                    formatter.write_dl(records)
        with formatter.section("Other options"):
            formatter.write_dl(other)
