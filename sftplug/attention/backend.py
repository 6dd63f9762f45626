"""The attention contract: the request a run makes, and the backend interface plugins implement.

The model calls ``backend(q, k, v, causal=..., doc_ids=...)`` with q [B, Hq, T, D] and
k, v [B, Hkv, T, D]; ``doc_ids`` [B, T] (non-decreasing along T) marks packed documents,
and None means one document per row. Models that need them add ``window=``, ``softcap=``,
``scale=`` and ``sinks=`` (only then, so a backend that cannot honour them is never called
with them: the request says which a run needs, and such a backend is unavailable, saying why).
Plugins offer backends through the ``select_attention`` hook;
:mod:`sftplug.attention.choice` picks one and says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sftplug.offers import Priority


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
    window: int = 0  # sliding window of the layers that have one (a query at i sees keys i - window < j <= i)
    softcap: float = 0.0  # attention scores soft-capped, softcap * tanh(s / softcap) (Gemma 2); 0: none
    scale: float | None = None  # the softmax scale, when it is not head_dim ** -0.5
    sinks: bool = False  # a learned logit per query head in the softmax's denominator (gpt-oss)


class AttentionBackend:
    """Base class: subclasses set ``name`` and ``priority`` and implement ``__call__``.

    ``__call__(q, k, v, *, causal=True, doc_ids=None)``: q [B, Hq, T, D], k and v
    [B, Hkv, T, D] (Hq a multiple of Hkv), ``doc_ids`` [B, T] non-decreasing along T or
    None; returns [B, Hq, T, D]. With ``doc_ids`` a query attends only to keys of its own
    document. A backend that cannot do that sets ``packed_documents = False`` and is
    never chosen for packed rows (why is shown instead). ``doc_ids`` is on q's
    device, or on the host for a backend that sets ``host_doc_ids = True``.

    Keyword options a backend declares it honours, passed only by models that need them:
    ``window=W`` (``sliding_window = True``: a query at i sees keys i - W < j <= i, within
    its document), ``softcap=c`` (``softcap = True``: scores s become c * tanh(s / c)
    before the softmax), ``scale=s`` (``custom_scale = True``: the softmax scale instead
    of head_dim ** -0.5) and ``sinks=tensor[Hq]`` (``sinks = True``: one logit s_h per query
    head joins each row's softmax denominator only, p_ij = exp(z_ij) / (exp(s_h) + sum_j'
    exp(z_ij')); the tensor is trained, so gradients reach it).
    """

    name = ""
    priority = 0  # "auto" picks the highest priority whose check passes (priority_for may vary it per request)
    description = ""
    packed_documents = True  # honours doc_ids (attends within documents only)
    host_doc_ids = False  # True: doc_ids arrive on the host (CPU), to plan packed rows there without a GPU sync
    sliding_window = False  # honours window=
    softcap = False  # honours softcap=
    custom_scale = False  # honours scale=
    sinks = False  # honours sinks= (and differentiates through it)

    def priority_for(self, request: AttentionRequest) -> Priority:
        """How strongly auto prefers this backend for ``request``: by default its ``priority``."""
        return Priority(self.priority)

    def check(self, request: AttentionRequest) -> str | None:
        """None when this backend can run the request, else why it is unavailable for it."""
        return None

    def __call__(self, q, k, v, *, causal: bool = True, doc_ids=None):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<attention backend {self.name}>"
