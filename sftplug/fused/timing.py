"""Each op on inputs of a request's sizes, and its forward and backward timed: how ``auto``
decides on a GPU whether a fused form is faster than PyTorch's, and what ``sftplug bench ops``
reports.

Every repetition gets fresh inputs outside the timed region (some forms work in place).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from sftplug.fused.grouped import Groups

CE_CHUNK = 4096  # rows of the loss's chunks (sftplug.train.loss.target_loss_sum)


@dataclass(frozen=True)
class OpCase:
    """One op's inputs at some sizes: ``make()`` returns (args, grad_out or None) on ``device``."""

    op: str
    shape: str  # e.g. "16384 x 2048"
    device: torch.device
    dtype: torch.dtype
    sizes: dict  # what make() builds from
    bytes_forward: int  # the least memory traffic of the forward: inputs read, outputs written
    bytes_backward: int

    def make(self, seed: int = 0, float64: bool = False):
        """(args of the op's call, the output's gradient or None for the loss step, the leaves to
        differentiate with respect to). ``float64``: the same values (rounded to the case's
        dtype), in float64, for a reference."""
        gen = torch.Generator().manual_seed(seed)
        s, dt, dev = self.sizes, self.dtype, self.device

        def rand(*shape, dtype=dt, grad=False, scale=1.0):
            t = (scale * torch.randn(shape, generator=gen)).to(dev, dtype)
            return (t.double() if float64 else t).requires_grad_(grad)

        if self.op == "rmsnorm":
            x = rand(s["rows"], s["hidden"], grad=True)
            w = (1 + 0.1 * rand(s["hidden"], dtype=s["weight_dtype"])).requires_grad_(s["trains_norms"])
            return (x, w, 1e-5, s["gemma"]), rand(s["rows"], s["hidden"]), [x, w] if s["trains_norms"] else [x]
        if self.op == "glu":
            gate_up = rand(s["rows"], 2 * s["intermediate"], grad=True)
            return (gate_up, s["activation"]), rand(s["rows"], s["intermediate"]), [gate_up]
        if self.op == "rope":
            x = rand(1, s["rows"], s["heads"], s["head_dim"], grad=True)
            angles = torch.rand(1, s["rows"], 1, s["rotary_dim"] // 2, generator=gen) * 100
            cos, sin = (f.to(dev, dt).to(torch.float64 if float64 else dt) for f in (angles.cos(), angles.sin()))
            # a copy, not the leaf: forms may rotate in place
            return (x.clone(), cos, sin, s["rotated"]), rand(1, s["rows"], s["heads"], s["head_dim"]), [x]
        if self.op == "cross_entropy":
            targets = torch.randint(0, s["vocab"], (s["rows"],), generator=gen).to(dev)
            return (rand(s["rows"], s["vocab"]), targets), None, []
        if self.op == "grouped_linear":
            return _grouped_linear_inputs(s, gen, rand)
        raise ValueError(self.op)


def case_for(op: str, request) -> OpCase:
    """The op at a :class:`sftplug.fused.FusedOpsRequest`'s sizes (one micro-batch; the loss: one chunk)."""
    r, size = request, torch.finfo(request.dtype).bits // 8
    rows = r.tokens
    if op == "rmsnorm":
        sizes = dict(rows=rows, hidden=r.hidden_size, gemma=r.gemma_norm, trains_norms=r.trains_norms,
                     weight_dtype=torch.float32 if r.trains_norms else r.dtype)
        moved = rows * r.hidden_size * size
        return OpCase(op, f"{rows} x {r.hidden_size}", r.device, r.dtype, sizes, 2 * moved, 3 * moved)
    if op == "glu":
        sizes = dict(rows=rows, intermediate=r.intermediate_size, activation=r.activation)
        moved = rows * r.intermediate_size * size
        return OpCase(op, f"{rows} x 2*{r.intermediate_size}", r.device, r.dtype, sizes, 3 * moved, 5 * moved)
    if op == "rope":
        heads = r.n_heads + 2 * r.n_kv_heads
        sizes = dict(rows=rows, heads=heads, head_dim=r.head_dim, rotary_dim=r.rotary_dim,
                     rotated=r.n_heads + r.n_kv_heads)
        moved = rows * sizes["rotated"] * r.rotary_dim * size
        return OpCase(op, f"{rows} x {heads} x {r.head_dim}", r.device, r.dtype, sizes, 2 * moved, 2 * moved)
    if op == "grouped_linear":  # the experts' gate_up projection: each token's top_k rows
        rows, out = rows * r.top_k, 2 * r.expert_intermediate_size
        sizes = dict(rows=rows, experts=r.experts, hidden=r.hidden_size, out=out, rank=r.lora_rank)
        weights = r.experts * out * r.hidden_size * size
        activations = rows * (r.hidden_size + out) * size
        # the backward reads dY, X and W and writes dX (and dW in full fine-tuning)
        return OpCase(op, f"{rows} x {r.hidden_size} -> {r.experts} x {out}", r.device, r.dtype, sizes,
                      activations + weights, 2 * activations + weights * (1 if r.lora_rank else 2))
    if op == "cross_entropy":
        rows = min(rows, CE_CHUNK)
        moved = rows * r.vocab_size * size
        return OpCase(op, f"{rows} x {r.vocab_size}", r.device, r.dtype, dict(rows=rows, vocab=r.vocab_size),
                      2 * moved, 0)
    raise ValueError(op)


def _grouped_linear_inputs(s: dict, gen, rand):
    """x [rows, hidden] routed uniformly at random and sorted by expert, the stacked weights, and a
    LoRA of rank ``s["rank"]`` (its A and B train, the weights not) or none (the weights train)."""
    experts = torch.randint(0, s["experts"], (s["rows"],), generator=gen).sort().values
    x = rand(s["rows"], s["hidden"], grad=True)
    full = not s["rank"]
    weight = rand(s["experts"], s["out"], s["hidden"], grad=full, scale=s["hidden"] ** -0.5)
    groups = Groups.of(experts.to(x.device), s["experts"])
    if full:
        return (x, groups, weight), rand(s["rows"], s["out"]), [x, weight]
    a = rand(s["experts"], s["rank"], s["hidden"], grad=True, scale=s["hidden"] ** -0.5)
    b = rand(s["experts"], s["out"], s["rank"], grad=True)
    return (x, groups, weight, None, (a, b, 2.0)), rand(s["rows"], s["out"]), [x, a, b]


def outputs(form, args, grad, leaves) -> list[torch.Tensor]:
    """[output, *gradients of the leaves] of one call; the loss step: [loss sum, logit gradient]."""
    out = form(*args)
    if grad is None:
        return [t.detach() for t in out]
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)]


def time_op(form, case: OpCase, reps: int = 10, warmup: int = 2) -> tuple[float, float | None]:
    """(forward ms, backward ms or None for the loss step, which computes its gradient in the
    forward): medians over ``reps``, after ``warmup`` untimed repetitions."""
    forward, backward = [], []
    for i in range(warmup + reps):
        args, grad, _ = case.make(seed=i)
        out = []
        forward.append(_timed(case.device, lambda: out.append(form(*args))))  # noqa: B023 - called at once
        if grad is not None:
            backward.append(_timed(case.device, lambda: out[0].backward(grad)))  # noqa: B023 - called at once
    forward_ms = statistics.median(forward[warmup:])
    return forward_ms, statistics.median(backward[warmup:]) if backward else None


def _timed(device: torch.device, fn) -> float:
    """Milliseconds of ``fn()``, measured with CUDA events on a GPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3
