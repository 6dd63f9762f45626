"""Choosing the attention backend of a run, out loud, and the shell variables that cannot steer it.

:func:`survey` asks every offered backend once per request whether it can run it, and
at which priority; :func:`choose_backend` takes the named backend or, for ``auto``, the
fastest that can, and says why in one line (or raises one that says what would work).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sftplug.attention.backend import AttentionBackend, AttentionRequest
from sftplug.deprecated import renamed_attribute
from sftplug.dtypes import dtype_name
from sftplug.errors import SftplugError
from sftplug.offers import Offer, checked, priority_of

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


@dataclass
class AttentionChoice:
    backend: AttentionBackend
    why_chosen: str  # one line for the run header
    rejected: dict[str, str]  # backend name -> why it is unavailable for this request

    reason = renamed_attribute("reason", "why_chosen")


def survey(hook, request: AttentionRequest) -> list[Offer]:
    """Every backend the plugins offer for ``request`` with its answer, fastest first."""
    offers = [_ask(b, request) for b in hook.select_attention(request=request) if b is not None]
    # pluggy calls later-registered plugins first; order by priority, then name.
    return sorted(offers, key=lambda o: (-o.priority, o.name))


def _ask(backend: AttentionBackend, request: AttentionRequest) -> Offer:
    """The one question a backend is asked per request: can you run it, and how fast are you here?"""
    priority = priority_of(backend, request)
    if request.packed and not getattr(backend, "packed_documents", True):
        why_unavailable = (
            f"{backend.name} cannot keep packed documents apart (it ignores doc_ids); "
            "train with --no-pack or pick a backend that can"
        )
        return Offer(backend, *priority, why_unavailable)
    missing = _missing_option(backend, request)
    if missing:
        return Offer(backend, *priority, f"{backend.name} cannot apply {missing}, which this model's attention uses")
    return Offer(backend, *priority, checked(backend, request))


def _missing_option(backend: AttentionBackend, request: AttentionRequest) -> str | None:
    """The first attention option the request needs and the backend does not declare, in words."""
    if request.window and not getattr(backend, "sliding_window", False):
        return f"a sliding window ({request.window} keys)"
    if request.softcap and not getattr(backend, "softcap", False):
        return f"soft-capped scores (cap {request.softcap:g})"
    if request.scale is not None and not getattr(backend, "custom_scale", False):
        return f"a softmax scale of {request.scale:.4g}"
    if request.sinks and not getattr(backend, "sinks", False):
        return "attention sinks (a learned logit per head in the softmax's denominator)"
    return None


def attention_skipped(registry) -> dict[str, str]:
    """Skipped plugins that offer attention (or failed to load): name -> why unavailable."""
    return {p.name: p.why_unavailable for p in registry.skipped() if "select_attention" in p.hooks or not p.hooks}


def choose_backend(hook, request: AttentionRequest, skipped: dict[str, str] | None = None) -> AttentionChoice:
    """Pick the backend for a run, or raise an error that says why and what would work.

    ``auto`` takes the fastest backend that can run the request (each backend's
    ``priority_for(request)`` orders them); a name takes that backend or fails with one
    line: which, why, and what is usable here. ``skipped``: plugins that did not
    register, name -> why unavailable (see :func:`attention_skipped`).
    """
    return choose_from(survey(hook, request), request, skipped)


def choose_from(offers: list[Offer], request: AttentionRequest, skipped: dict[str, str] | None = None
                ) -> AttentionChoice:
    """:func:`choose_backend` on the answers :func:`survey` collected."""
    skipped = skipped or {}
    working = [o.backend for o in offers if o.why_unavailable is None]
    rejected = {o.name: o.why_unavailable for o in offers if o.why_unavailable is not None}
    what = describe_request(request)
    works = ", ".join(b.name for b in working) or "none"
    if request.name == "auto":
        if not working:
            raise SftplugError(f"no attention backend can run {what}: " + _listed(rejected | skipped))
        best = working[0]
        order = " > ".join(b.name for b in working)
        why_chosen = f"{best.name} (auto: the fastest that runs {what} here; usable in order: {order}"
        if rejected:
            why_chosen += f"; not usable: {', '.join(rejected)}"
        if best.name == "math":
            why_chosen += "; math is the slow reference kernel: no fused kernel runs this request"
        return AttentionChoice(best, why_chosen + ")", rejected)
    chosen = next((o.backend for o in offers if o.name == request.name), None)
    if chosen is None:
        if request.name in skipped:
            raise SftplugError(
                f"attention backend '{request.name}' is unavailable: {skipped[request.name]}; usable here: {works}"
            )
        known = sorted({o.name for o in offers} | set(skipped))
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
    model_config = model.config
    request = AttentionRequest(name, torch.device(device), dtype, model_config.head_dim, model_config.n_heads,
                               model_config.n_kv_heads, packed, seq_len, **model.attention_options(seq_len))
    choice = choose_backend(registry.hook, request, attention_skipped(registry))
    model.set_attention(choice.backend)
    return choice


def describe_request(request: AttentionRequest) -> str:
    """'bf16, head dim 64, 32/4 heads, packed rows on cuda'."""
    heads = f"{request.n_heads}/{request.n_kv_heads} heads" if request.n_kv_heads != request.n_heads else (
        f"{request.n_heads} heads"
    )
    packed = ", packed rows" if request.packed else ""
    window = f", sliding window {request.window}" if request.window else ""
    softcap = f", soft-cap {request.softcap:g}" if request.softcap else ""
    sinks = ", sinks" if request.sinks else ""
    return (f"{dtype_name(request.dtype)}, head dim {request.head_dim}, {heads}{packed}{window}{softcap}{sinks} "
            f"on {request.device.type}")


def _listed(why_unavailable: dict[str, str]) -> str:
    return "; ".join(f"{name}: {why}" for name, why in why_unavailable.items()) or "no backend offered"


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
