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
