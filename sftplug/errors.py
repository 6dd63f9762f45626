"""User-facing errors: one clear line, exit code 2, no traceback (the CLI maps them)."""

from __future__ import annotations

import difflib


class SftplugError(Exception):
    """Bad input or an impossible request; the message says what and how to fix it."""

    exit_code = 2


def closest(name: str, candidates) -> str | None:
    """The candidate a misspelt ``name`` most likely meant, or None: for "did you mean" hints."""
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None
