"""The fused-ops contract: the ops a model computes outside its matrix products, the request a
run makes for them, and the interface a plugin implements to offer a faster form of one.

Every op has a PyTorch form (:mod:`sftplug.fused.pytorch`) that the model runs unless a
plugin's fused form is chosen for it. The forms of one op are interchangeable: the same
inputs, the same result up to rounding, gradients included. The call of each op:

- ``rmsnorm(x, weight, eps, gemma)``: ``x`` [..., C], ``weight`` [C]. Llama form
  (``gemma=False``): ``weight * normalize(x).to(x.dtype)``, in the promoted dtype of x and
  weight. Gemma form: ``((1 + weight) * normalize(x))`` in fp32, then ``x.dtype``.
  ``normalize`` is ``x * rsqrt(mean(x^2) + eps)`` in fp32.
- ``glu(gate_up, activation)``: ``gate_up`` [..., 2I] (gate first, then up) ->
  ``act(gate) * up`` [..., I]; ``activation`` is "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
- ``rope(qkv, cos, sin, n_rotated)``: ``qkv`` [B, T, H, D]; the first ``n_rotated`` heads
  are rotated over their first R = 2 * cos.shape[-1] dims (pairs i and i + R/2), the rest
  is left as it is; ``cos``, ``sin`` [B, T, 1, R/2]. May rotate in place; returns the result.
- ``cross_entropy(logits, targets)``: ``logits`` [n, V], ``targets`` [n] ->
  ``(loss_sum, grad)``: the sum of the rows' cross-entropies (fp32, 0-dim) and its gradient
  with respect to the logits, in their dtype. ``grad`` may be ``logits`` itself, overwritten.
  The LM head and the chunking around it stay in :mod:`sftplug.train.loss`.
- ``grouped_linear(x, groups, weight, bias, lora)``: the experts' linear layers over rows
  grouped by expert (:class:`sftplug.fused.grouped.Groups`): ``x`` [M, K] -> [M, N], the rows
  of expert e get ``x W_e^T + b_e + s (x A_e^T) B_e^T``; ``weight`` [E, N, K] (any strides),
  ``bias`` [E, N] or None, ``lora`` None or (A [E, r, K], B [E, N, r], s). Gradients reach
  every input that requires them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sftplug.fused import grouped, pytorch
from sftplug.offers import Priority

OPS = ("rmsnorm", "glu", "rope", "cross_entropy", "grouped_linear")


@dataclass(frozen=True)
class FusedOpsRequest:
    """What a run computes these ops on; a fused form checks it before it is chosen."""

    device: torch.device
    dtype: torch.dtype  # the compute dtype (autocast's, or the weights')
    hidden_size: int
    intermediate_size: int
    head_dim: int
    rotary_dim: int  # dims of each head that RoPE rotates (head_dim, or fewer for partial rotary)
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    tokens: int  # tokens of one micro-batch (the rows an op sees at once)
    activation: str = "silu"  # the gated MLP's: "silu" or "gelu_tanh"
    gemma_norm: bool = False  # RMSNorm in Gemma's (1 + w) form
    trains_norms: bool = False  # the norms' weights train (full fine-tuning), so need their gradient
    # A mixture of experts (grouped_linear): routed experts (0: a dense model, which never computes
    # grouped_linear), each expert's intermediate size, experts per token, and the experts' LoRA
    # rank (0: the experts' weights train, full fine-tuning)
    experts: int = 0
    expert_intermediate_size: int = 0
    top_k: int = 0
    lora_rank: int = 0

    def uses(self, op: str) -> bool:
        """Whether a model of this request computes ``op``: all of them but grouped_linear, which
        only a mixture of experts does."""
        return op != "grouped_linear" or self.experts > 0


class FusedOp:
    """Base class: a plugin's fused form of one op. Subclasses set ``op`` (one of :data:`OPS`),
    ``name`` (the implementation's, e.g. "triton") and implement ``__call__`` with the op's call.

    ``auto`` takes a fused form only where its ``priority_for(request)`` is above 0 (the
    PyTorch form's) and its ``check(request)`` passes; a form asked for by name needs only
    the check.
    """

    op = ""
    name = ""
    priority = 0
    description = ""

    def priority_for(self, request: FusedOpsRequest) -> Priority:
        """Above 0 when this form is faster than PyTorch's here, and why (a plain
        ``(value, why_chosen)`` pair is the same shape)."""
        return Priority(self.priority)

    def check(self, request: FusedOpsRequest) -> str | None:
        """None when this form can compute the request exactly, else why it is unavailable for it."""
        return None

    def __call__(self, *args, **kwargs):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<fused {self.op} {self.name}>"


@dataclass(frozen=True)
class OpSet:
    """The form a model computes each op with: PyTorch's unless a fused form was chosen."""

    rmsnorm: Callable = pytorch.rmsnorm
    glu: Callable = pytorch.glu
    rope: Callable = pytorch.rope
    cross_entropy: Callable = pytorch.cross_entropy
    grouped_linear: Callable = grouped.grouped_linear
