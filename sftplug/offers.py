"""A backend's answer to a run's request, the same for every kind of backend (an attention
backend, a fused op's form).

A backend is asked two things about a request: can it run it (``check(request)``: None, or
why it is unavailable), and how strongly ``auto`` should prefer it there
(``priority_for(request)``: a :class:`Priority`). :mod:`sftplug.attention.choice` and
:mod:`sftplug.fused.choice` collect the answers as :class:`Offer` s and choose among them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from sftplug.deprecated import warn_deprecated


class Priority(NamedTuple):
    """What ``priority_for(request)`` returns: how strongly ``auto`` prefers a backend for the
    request (the highest usable value wins), and why, for the run header (e.g. a measured speed-up)."""

    value: int
    why_chosen: str = ""


@dataclass(frozen=True)
class Offer:
    """One backend's answer to one request."""

    backend: Any  # an AttentionBackend, or a FusedOp (one op's form)
    priority: int
    why_chosen: str = ""  # Priority.why_chosen
    why_unavailable: str | None = None  # None: it can run the request

    @property
    def name(self) -> str:
        return self.backend.name


def priority_of(backend, request) -> Priority:
    """``backend.priority_for(request)`` as a :class:`Priority` (its ``priority`` when it has no such method).

    A bare number, which attention backends used to return, is still taken, with a warning.
    """
    if not hasattr(backend, "priority_for"):
        return Priority(backend.priority)
    answer = backend.priority_for(request)
    if not isinstance(answer, tuple):
        warn_deprecated(f"{type(backend).__name__}.priority_for returning a bare number",
                        "sftplug.offers.Priority(value, why_chosen)")
        return Priority(answer)
    return Priority(*answer)


def checked(backend, request) -> str | None:
    """``backend.check(request)``: None, or why it is unavailable; a check that raises says so
    instead of breaking the choice (a third-party check may)."""
    try:
        return backend.check(request)
    except Exception as exc:
        return f"its check raised {type(exc).__name__}: {exc}"
