"""The linear-attention contract: the request a run with Gated DeltaNet layers makes, and the
interface a backend implements (the gated delta rule, sftplug.linear_attention.pytorch).

The mixer calls ``backend(q, k, v, g, beta, doc_ids)``: q, k [B, T, Hk, Dk] L2-normalised,
v [B, T, Hv, Dv], g [B, T, Hv] the log decay (fp32, <= 0), beta [B, T, Hv], doc_ids [B, T]
non-decreasing (packed documents: the state restarts at each) or None; it returns o [B, T, Hv, Dv]
in v's dtype, with gradients for every input. Plugins offer backends through the
``select_linear_attention`` hook; :mod:`sftplug.linear_attention.choice` picks one and says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sftplug.offers import Priority


@dataclass(frozen=True)
class LinearAttentionRequest:
    name: str  # a backend name, or "auto"
    device: torch.device
    dtype: torch.dtype
    key_heads: int
    value_heads: int
    key_head_dim: int
    value_head_dim: int
    packed: bool = False  # rows hold several documents (doc_ids will be passed)
    seq_len: int = 0  # the longest row; 0 when unknown


class LinearAttentionBackend:
    """Base class: subclasses set ``name``, ``priority``, ``description`` and implement ``__call__``."""

    name = ""
    priority = 0  # "auto" takes the highest whose check passes (priority_for may vary it per request)
    description = ""

    def priority_for(self, request: LinearAttentionRequest) -> Priority:
        return Priority(self.priority)

    def check(self, request: LinearAttentionRequest) -> str | None:
        """None when this backend can run the request, else why it is unavailable for it."""
        return None

    def __call__(self, q, k, v, g, beta, doc_ids=None):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<linear attention backend {self.name}>"


def first_run_error(kernel, label: str, device: str, dtype: torch.dtype, inputs, doc_ids, grad) -> str | None:
    """None when ``kernel(q, k, v, g, beta, doc_ids)`` on ``device`` in ``dtype`` (g and beta fp32) gives the
    float64 PyTorch form's output and gradients, else why not, beginning with ``label`` (a backend's first run)."""
    from sftplug.dtypes import dtype_name
    from sftplug.linear_attention.pytorch import gated_delta_rule as reference

    what = f"{dtype_name(dtype)}, head dims {inputs[0].shape[-1]}/{inputs[2].shape[-1]} on {device}"
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False):
        try:
            x = [a.to(device, dtype if i < 3 else torch.float32).requires_grad_() for i, a in enumerate(inputs)]
            out = kernel(*x, doc_ids.to(device))
            got = [out, *torch.autograd.grad(out, x, grad.to(device, out.dtype))]
        except Exception as exc:  # an import, compilation, launch or driver error: why unavailable, not a crash
            return f"{label} failed its first run for {what}: {type(exc).__name__}: {exc}"
        x = [a.double().requires_grad_() for a in inputs]
        out = reference(*x, doc_ids)
        ref = [out, *torch.autograd.grad(out, x, grad.double())]
    # relative to the largest value: a few roundings of the dtype over a 40-token recurrence; a wrong kernel is O(1) off
    tolerance = max(32 * torch.finfo(dtype).eps, 1e-4)
    for name, a, r in zip(("output", "dq", "dk", "dv", "dg", "dbeta"), got, ref):
        error = float((a.detach().double().cpu() - r.detach()).abs().max() / r.detach().abs().max())
        if not error <= tolerance:
            return f"{label}'s first run for {what} is wrong: {name} off by {error:.1e}"
    return None
