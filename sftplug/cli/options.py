"""What every sftplug command shares: help options, and user errors as one line, exit 2."""

from __future__ import annotations

import functools
import os
import re

import click

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


def options(*decorators):
    """Several click options as one reusable decorator."""

    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply
