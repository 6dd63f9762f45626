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
from sftplug.dtypes import dtype_name

# Environment variables that steer attention kernels behind a trainer's back: PyTorch's
# own (TORCH_CUDNN_SDPA_*), and the ones scripts and other libraries read to flip
# torch.backends.cuda.enable_*_sdp (PYTORCH_SDP_KERNEL, SDPA_BACKEND, ...).
STEERING_ENV_PREFIXES = (
    "PYTORCH_SDP",
    "SDPA_",
    "TORCH_SDP",
    "TORCH_CUDNN_SDPA",
    "TORCH_FLASH",
    "FLASH_ATTENTION",
    "FLASH_ATTN",
    "XFORMERS_",
)
STEERING_ENV_NAMES = ("ATTN_BACKEND", "ATTENTION_BACKEND", "ATTN_IMPLEMENTATION", "ATTENTION_IMPLEMENTATION")


@dataclass(frozen=True)
class AttentionRequest:
    name: str  # a backend name, or "auto"
    device: torch.device
    dtype: torch.dtype
    head_dim: int
    n_heads: int
    n_kv_heads: int
    packed: bool = False  # rows hold several documents (doc_ids will be passed)
    seq_len: int = 0  # the longest row the run attends over; 0 when unknown


class AttentionBackend:
    """Base class: subclasses set ``name`` and ``priority`` and implement ``__call__``.

    ``__call__(q, k, v, *, causal=True, doc_ids=None)``: q [B, Hq, T, D], k and v
    [B, Hkv, T, D] (Hq a multiple of Hkv), ``doc_ids`` [B, T] non-decreasing along T or
    None; returns [B, Hq, T, D]. With ``doc_ids`` a query attends only to keys of its own
    document. A backend that cannot do that sets ``packed_documents = False`` and is
    never chosen for packed rows (its reason is shown instead).
    """

    name = ""
    priority = 0  # "auto" picks the highest priority whose check passes
    description = ""
    packed_documents = True  # honours doc_ids (attends within documents only)

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
        if key.upper() in STEERING_ENV_NAMES or key.upper().startswith(STEERING_ENV_PREFIXES)
    }


def steering_notes(environ=None) -> list[str]:
    """One line per steering variable: what it is and that sftplug's choice stands."""
    return [
        f"{key}={value} found and ignored: attention runs only in the chosen kernel "
        "(sdpa_kernel([backend]) around every call)"
        for key, value in steering_env(environ).items()
    ]


def attention_skipped(registry) -> dict[str, str]:
    """Skipped plugins that offer attention (or failed to load): name -> reason."""
    return {
        p.name: p.reason
        for p in registry.skipped()
        if "select_attention" in p.hooks or not p.hooks
    }


def one_document_per_row(doc_ids: torch.Tensor) -> bool:
    """True when no row of ``doc_ids`` [B, T] holds two documents (one host sync)."""
    return doc_ids.shape[1] == 0 or bool((doc_ids[:, :1] == doc_ids).all())


def offered_backends(hook, request: AttentionRequest) -> list[AttentionBackend]:
    """Every backend the plugins offer for ``request``, fastest first."""
    offers = [b for b in hook.select_attention(request=request) if b is not None]
    # pluggy calls later-registered plugins first; order by priority, then name.
    return sorted(offers, key=lambda b: (-b.priority_for(request), b.name))


def why_not(backend: AttentionBackend, request: AttentionRequest) -> str | None:
    """None when ``backend`` can run ``request``, else why; a raising check is a reason too."""
    if request.packed and not getattr(backend, "packed_documents", True):
        return (
            f"{backend.name} cannot keep packed documents apart (it ignores doc_ids); "
            "train with --no-pack or pick a backend that can"
        )
    try:
        return backend.check(request)
    except Exception as exc:  # a third-party check must not break the choice
        return f"its check raised {type(exc).__name__}: {exc}"


def choose_backend(hook, request: AttentionRequest, skipped: dict[str, str] | None = None) -> AttentionChoice:
    """Pick the backend for a run, or raise an error that says why and what would work.

    ``auto`` takes the fastest backend whose check passes (the order is each backend's
    ``priority_for(request)``: measured per GPU generation for the built-ins); a name
    takes that backend or fails with one line: which, why, and what is usable here.
    ``skipped``: plugins that did not register, name -> reason (see
    :func:`attention_skipped`).
    """
    skipped = skipped or {}
    offers = offered_backends(hook, request)
    verdicts = {b.name: why_not(b, request) for b in offers}
    working = [b for b in offers if verdicts[b.name] is None]
    rejected = {name: why for name, why in verdicts.items() if why is not None}
    what = describe_request(request)
    works = ", ".join(b.name for b in working) or "none"
    if request.name == "auto":
        if not working:
            raise SftplugError(f"no attention backend can run {what}: " + _reasons(rejected | skipped))
        best = working[0]
        order = " > ".join(b.name for b in working)
        reason = f"{best.name} (auto: the fastest that runs {what} here; usable in order: {order}"
        if rejected:
            reason += f"; not usable: {', '.join(rejected)}"
        if best.name == "math":
            reason += "; math is the slow reference kernel: no fused kernel runs this request"
        return AttentionChoice(best, reason + ")", rejected)
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
    note = "; math is the slow reference kernel" if chosen.name == "math" else ""
    return AttentionChoice(chosen, f"{chosen.name} (requested; runs {what}{note})", rejected)


def attach(model, registry, name: str, device, dtype: torch.dtype, packed: bool = False,
           seq_len: int = 0) -> AttentionChoice:
    """Choose the backend ``name`` (or auto) for ``model`` and set it on every block."""
    c = model.config
    request = AttentionRequest(name, torch.device(device), dtype, c.head_dim, c.n_heads, c.n_kv_heads, packed,
                               seq_len)
    choice = choose_backend(registry.hook, request, attention_skipped(registry))
    model.set_attention(choice.backend)
    return choice


def describe_request(request: AttentionRequest) -> str:
    """'bf16, head dim 64, 32/4 heads, packed rows on cuda'."""
    heads = f"{request.n_heads}/{request.n_kv_heads} heads" if request.n_kv_heads != request.n_heads else (
        f"{request.n_heads} heads"
    )
    packed = ", packed rows" if request.packed else ""
    return f"{dtype_name(request.dtype)}, head dim {request.head_dim}, {heads}{packed} on {request.device.type}"


def _reasons(reasons: dict[str, str]) -> str:
    return "; ".join(f"{name}: {why}" for name, why in reasons.items()) or "no backend offered"
