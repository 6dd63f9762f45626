"""Old names and shapes that third-party code may still use: each keeps working, with a
DeprecationWarning that names its replacement."""

from __future__ import annotations

import warnings


def warn_deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated in favour of ``new`` (by default, at the caller's caller)."""
    warnings.warn(f"{old} is deprecated: use {new}", DeprecationWarning, stacklevel=stacklevel)


def renamed_attribute(old: str, new: str) -> property:
    """A read-only property ``old`` that returns the attribute ``new``, with a warning naming it."""

    def get(self):
        owner = type(self).__name__
        warn_deprecated(f"{owner}.{old}", f"{owner}.{new}")
        return getattr(self, new)

    return property(get, doc=f"Deprecated: use {new}.")
