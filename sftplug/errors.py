"""User-facing errors: one clear line, exit code 2, no traceback (the CLI maps them)."""


class SftplugError(Exception):
    """Bad input or an impossible request; the message says what and how to fix it."""

    exit_code = 2
