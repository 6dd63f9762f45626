"""Attention backends: the request a run makes, the backend interface, and the choice.

The model calls ``backend(q, k, v, causal=..., doc_ids=...)`` with q [B, Hq, T, D] and
k, v [B, Hkv, T, D]; ``doc_ids`` [B, T] (non-decreasing along T) marks packed documents,
and None means one document per row. Plugins offer backends through the
``select_attention`` hook; :func:`choose_backend` picks one and says why, out loud.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sftplug.errors import SftplugError

# Environment variables that steer attention kernels behind a trainer's back.
STEERING_ENV_PREFIXES = ("PYTORCH_SDP", "SDPA_", "TORCH_CUDNN_SDPA", "TORCH_SDPA")
STEERING_ENV_NAMES = ("PYTORCH_SDP_KERNEL", "SDPA_BACKEND", "FLASH_ATTENTION_DISABLE", "ATTN_BACKEND")


@dataclass(frozen=True)
class AttentionRequest:
    name: str  # a backend name, or "auto"
    device: torch.device
    dtype: torch.dtype
    head_dim: int
    n_heads: int
    n_kv_heads: int
    packed: bool = False  # rows hold several documents (doc_ids will be passed)


class AttentionBackend:
    """Base class: subclasses set ``name`` and ``priority`` and implement ``__call__``."""

    name = ""
    priority = 0  # "auto" picks the highest priority whose check passes
    description = ""

    def priority_for(self, request: AttentionRequest) -> int:
        return self.priority

    def check(self, request: AttentionRequest) -> str | None:
        """None when this backend can run the request, else the reason it cannot."""
        return None

    def __call__(self, q, k, v, *, causal: bool = True, doc_ids=None):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<attention backend {self.name}>"


@dataclass
class AttentionChoice:
    backend: AttentionBackend
    reason: str  # one line for the run header
    rejected: dict[str, str]  # backend name -> why it cannot run this request


def steering_env(environ=None) -> dict[str, str]:
    """Environment variables that try to steer attention kernels, as found."""
    environ = os.environ if environ is None else environ
    return {
        key: value
        for key, value in sorted(environ.items())
        if key in STEERING_ENV_NAMES or key.startswith(STEERING_ENV_PREFIXES)
    }


def offered_backends(hook, request: AttentionRequest) -> list[AttentionBackend]:
    offers = [b for b in hook.select_attention(request=request) if b is not None]
    # pluggy calls later-registered plugins first; order by priority, then name.
    return sorted(offers, key=lambda b: (-b.priority_for(request), b.name))


def choose_backend(hook, request: AttentionRequest, skipped: dict[str, str] | None = None) -> AttentionChoice:
    """Pick the backend for a run, or raise an error that says why and what would work."""
    skipped = skipped or {}
    offers = offered_backends(hook, request)
    rejected = {b.name: b.check(request) for b in offers}
    working = [b for b in offers if rejected[b.name] is None]
    rejected = {name: why for name, why in rejected.items() if why is not None}
    what = f"{_dtype_name(request.dtype)} on {request.device.type}"
    works = ", ".join(b.name for b in working) or "none"
    if request.name == "auto":
        if not working:
            raise SftplugError(f"no attention backend can run {what}: " + _reasons(rejected | skipped))
        best = working[0]
        others = f"; also usable: {', '.join(b.name for b in working[1:])}" if len(working) > 1 else ""
        return AttentionChoice(best, f"{best.name} (auto: highest-priority backend that runs {what}{others})", rejected)
    chosen = next((b for b in offers if b.name == request.name), None)
    if chosen is None:
        if request.name in skipped:
            raise SftplugError(
                f"attention backend '{request.name}' is unavailable: {skipped[request.name]}; usable here: {works}"
            )
        known = sorted({b.name for b in offers} | set(skipped))
        raise SftplugError(
            f"unknown attention backend '{request.name}'; known: {', '.join(known)} (or auto); usable here: {works}"
        )
    if request.name in rejected:
        raise SftplugError(
            f"attention backend '{request.name}' cannot run {what}: {rejected[request.name]}; usable here: {works}"
        )
    return AttentionChoice(chosen, f"{chosen.name} (requested)", rejected)


def _reasons(reasons: dict[str, str]) -> str:
    return "; ".join(f"{name}: {why}" for name, why in reasons.items()) or "no backend offered"


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
