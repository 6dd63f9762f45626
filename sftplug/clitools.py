"""What every sftplug command shares: help options, and user errors as one line, exit 2."""

from __future__ import annotations

import functools

import click

from sftplug.errors import SftplugError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class UserError(click.ClickException):
    exit_code = 2


def user_errors(fn):
    """Turn SftplugError into one clear line and exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SftplugError as exc:
            raise UserError(str(exc)) from None

    return wrapper


def options(*decorators):
    """Several click options as one reusable decorator."""

    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply
