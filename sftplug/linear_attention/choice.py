"""Choosing the linear-attention backend of a run with Gated DeltaNet layers, out loud:
``--linear-attention auto`` takes the fastest backend that can run the request, a name takes
that one or fails in one line naming why and what is usable here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sftplug.dtypes import dtype_name
from sftplug.errors import SftplugError
from sftplug.linear_attention.backend import LinearAttentionBackend, LinearAttentionRequest
from sftplug.offers import Offer, checked, priority_of


@dataclass
class LinearAttentionChoice:
    backend: LinearAttentionBackend
    why_chosen: str  # one line for the run header
    rejected: dict[str, str]  # backend name -> why it is unavailable for this request


def survey(hook, request: LinearAttentionRequest) -> list[Offer]:
    """Every backend the plugins offer for ``request`` with its answer, fastest first."""
    offers = []
    for backends in hook.select_linear_attention(request=request):
        for backend in backends or ():
            offers.append(Offer(backend, *priority_of(backend, request), checked(backend, request)))
    return sorted(offers, key=lambda o: (-o.priority, o.name))


def choose_linear_attention(hook, request: LinearAttentionRequest, skipped: dict[str, str] | None = None
                            ) -> LinearAttentionChoice:
    """The backend for ``request.name`` (or auto), or one line saying why not and what would work."""
    offers, skipped = survey(hook, request), skipped or {}
    working = [o for o in offers if o.why_unavailable is None]
    rejected = {o.name: o.why_unavailable for o in offers if o.why_unavailable is not None}
    what = describe_request(request)
    usable = ", ".join(o.name for o in working) or "none"
    if request.name == "auto":
        if not working:
            listed = "; ".join(f"{n}: {why}" for n, why in (rejected | skipped).items()) or "no backend offered"
            raise SftplugError(f"no linear-attention backend can run {what}: {listed}")
        best = working[0]
        why = f"; {best.why_chosen}" if best.why_chosen else ""
        order = " > ".join(o.name for o in working)
        return LinearAttentionChoice(best.backend, f"{best.name} (auto: the fastest that runs {what} here{why}; "
                                                   f"usable in order: {order})", rejected)
    chosen = next((o for o in offers if o.name == request.name), None)
    if chosen is None:
        if request.name in skipped:
            raise SftplugError(f"--linear-attention {request.name} is unavailable: {skipped[request.name]}; "
                               f"usable here: {usable}")
        known = ", ".join(sorted({o.name for o in offers} | set(skipped)))
        raise SftplugError(f"--linear-attention {request.name}: no such backend; known: {known} (or auto); "
                           f"usable here: {usable}")
    if chosen.why_unavailable is not None:
        raise SftplugError(f"--linear-attention {request.name} cannot run {what}: {chosen.why_unavailable}; "
                           f"usable here: {usable}")
    return LinearAttentionChoice(chosen.backend, f"{chosen.name} (requested; runs {what})", rejected)


def linear_attention_skipped(registry) -> dict[str, str]:
    """Skipped plugins that offer linear attention: name -> why unavailable."""
    return {p.name: p.why_unavailable for p in registry.skipped() if "select_linear_attention" in p.hooks}


def attach_linear_attention(model, registry, name: str, device, dtype: torch.dtype, packed: bool = False,
                            seq_len: int = 0) -> LinearAttentionChoice | None:
    """Choose the backend ``name`` (or auto) for the model's Gated DeltaNet layers and set it on each;
    None for a model without them."""
    config = model.config
    if not any(t.mixer == "linear_attention" for t in config.layer_types):
        return None
    o = config.linear_attention
    request = LinearAttentionRequest(name, torch.device(device), dtype, o.key_heads, o.value_heads, o.key_head_dim,
                                     o.value_head_dim, packed, seq_len)
    choice = choose_linear_attention(registry.hook, request, linear_attention_skipped(registry))
    for i, block in enumerate(model.layers):
        if config.layer_type(i).mixer == "linear_attention":
            block.attn.backend = choice.backend
    return choice


def describe_request(request: LinearAttentionRequest) -> str:
    """'bf16, 16/32 heads of 128/128, packed rows on cuda'."""
    packed = ", packed rows" if request.packed else ""
    return (f"{dtype_name(request.dtype)}, {request.key_heads}/{request.value_heads} heads of "
            f"{request.key_head_dim}/{request.value_head_dim}{packed} on {request.device.type}")
