"""The PyTorch form of each op (the calls are in :mod:`sftplug.fused.op`): what a model
computes with unless a fused form is chosen, and the fastest form on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sftplug.fused.grouped import grouped_linear  # noqa: F401 - the op's PyTorch form, listed with the others

ACTIVATIONS = ("silu", "gelu_tanh")


def rmsnorm(x, weight, eps: float, gemma: bool = False):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (h * (1.0 + weight.float())).to(x.dtype)
    return weight * h.to(x.dtype)


def glu(gate_up, activation: str = "silu"):
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown activation {activation!r} (known: {', '.join(ACTIVATIONS)})")


def rope(qkv, cos, sin, n_rotated: int):
    return _Rope.apply(qkv, cos, sin, n_rotated)


class _Rope(torch.autograd.Function):
    # By hand: the backward is the inverse rotation, with no cat, neg or full-width cos/sin
    # (a third of autograd's time for this op on the CPU).
    @staticmethod
    def forward(ctx, qkv, cos, sin, n_rotated):
        ctx.save_for_backward(cos, sin)
        ctx.n_rotated = n_rotated
        return _rotate(qkv, cos, sin, n_rotated, 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, ctx.n_rotated, -1.0), None, None, None


def _rotate(x, cos, sin, n_rotated: int, sign: float):
    """The first ``n_rotated`` heads' first R dims as halves (x1, x2) -> (x1 cos - sign x2 sin,
    x2 cos + sign x1 sin); everything else copied."""
    half = cos.shape[-1]
    rotated, rest = x[:, :, :n_rotated], x[:, :, n_rotated:]
    x1, x2, tail = rotated[..., :half], rotated[..., half : 2 * half], rotated[..., 2 * half :]
    if torch.compiler.is_compiling():  # inductor fuses this anyway; out= into slices breaks its graph
        return torch.cat((torch.cat((x1 * cos - sign * x2 * sin, x2 * cos + sign * x1 * sin, tail), dim=-1),
                          rest), dim=2)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out_rotated = out[:, :, :n_rotated]
    torch.mul(x1, cos, out=out_rotated[..., :half]).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out_rotated[..., half : 2 * half]).addcmul_(x1, sin, value=sign)
    if tail.shape[-1]:  # partial rotary: the other dims pass through
        out_rotated[..., 2 * half :].copy_(tail)
    if rest.shape[2]:
        out[:, :, n_rotated:].copy_(rest)
    return out


def cross_entropy(logits, targets):
    # In place, a pass or two each (torch.logsumexp alone was slower, BENCHMARKS.md), on the
    # logits themselves when they are fp32 or wider, else on an fp32 copy.
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # Shifted by the row max, the sum of exponentials is at least 1, so its log is finite.
    shifted = x.sub_(x.amax(-1, keepdim=True))
    target = shifted.gather(1, targets[:, None]).squeeze(1)  # [n]
    probs = shifted.exp_()
    sums = probs.sum(-1)  # [n]
    loss_sum = (sums.log() - target).sum()
    probs.div_(sums[:, None])  # softmax
    probs[torch.arange(len(targets), device=targets.device), targets] -= 1  # d(loss)/d(logits)
    return loss_sum, probs.to(logits.dtype)
