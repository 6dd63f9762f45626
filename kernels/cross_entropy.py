"""Fused cross-entropy over rows of logits in Triton: loss and logit gradient in one kernel.

One program per row streams over the vocabulary in blocks twice: the first pass keeps an
online max and sum of exponentials (fp32), giving the row's log-sum-exp; the second pass
writes softmax - onehot(target) over the logits in place. The row is read twice and written
once, in its own dtype; nothing of size [n, V] is allocated.

It is the per-chunk step of sftplug's chunked LM-head loss (sftplug/train/loss.py): the
chunk loop and the matrix products stay there, and this runs inside its autograd
Function's forward, so there is no autograd here.

Public API: :func:`cross_entropy_`, :func:`cross_entropy_reference`,
:func:`cross_entropy_available`, :func:`compile_specs`.
"""

from __future__ import annotations

import torch

from sftplug.kernels.runtime import check_cuda, interpreted, on_device, tl, triton, triton_available

__all__ = ["compile_specs", "cross_entropy_", "cross_entropy_available", "cross_entropy_reference"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_BLOCK = 4096  # columns per step: large rows (32000 ... 262144) loop, registers stay small
_W1_VOCAB = 32000


# ---------------------------------------------------------------------------------------
# Plain-PyTorch reference
# ---------------------------------------------------------------------------------------


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses [n], d(sum of losses)/d(logits) [n, V]) in plain PyTorch, out of place.

    Computed in the logits' dtype promoted to at least fp32; the gradient is rounded to the
    logits' dtype, as :func:`cross_entropy_` stores it.
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    losses = torch.logsumexp(x, dim=-1) - x.gather(1, targets[:, None]).squeeze(1)
    grad = torch.softmax(x, dim=-1)
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1
    return losses, grad.to(logits.dtype)


# ---------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _cross_entropy_kernel(
        LOGITS,  # [n, V] logits, rows contiguous; overwritten with softmax - onehot(target)
        TARGETS,  # int64 [n] target column of each row
        LOSSES,  # fp32 [n] logsumexp(row) - row[target], written here
        stride_row,  # elements between the starts of two rows (>= V)
        V,  # columns per row (the vocabulary)
        BLOCK: tl.constexpr,  # columns per step of the loops over the row
    ):
        row = tl.program_id(0).to(tl.int64)  # row * stride_row exceeds 2^31 at 4096 x 262144
        row_start = LOGITS + row * stride_row
        target = tl.load(TARGETS + row)
        # Read before pass 2 overwrites the row. A target outside [0, V) reads nothing outside
        # the row and gives a NaN loss.
        target_ok = (target >= 0) & (target < V)
        target_logit = tl.load(row_start + target, mask=target_ok, other=float("nan")).to(tl.float32)

        # Pass 1: online max and sum of exp(x - max); the sum is at least 1 once a block is seen.
        offs0 = tl.arange(0, BLOCK)
        run_max = tl.full([], float("-inf"), tl.float32)
        run_sum = tl.zeros([], tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + offs0
            x = tl.load(row_start + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, tl.max(x, axis=0))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            run_max = new_max
        lse = run_max + tl.log(run_sum)
        inv_sum = 1.0 / run_sum

        # Pass 2: the gradient of the row's loss, written over the logits; the target's -1 goes
        # in here so the target column is never stored twice (no read-after-write in the row).
        # exp(x - max) / sum, not exp(x - lse): x - max is exact, lse carries a rounding of its size.
        for start in range(0, V, BLOCK):
            offs = start + offs0
            in_row = offs < V
            x = tl.load(row_start + offs, mask=in_row, other=0.0, eviction_policy="evict_first").to(tl.float32)
            grad = tl.exp(x - run_max) * inv_sum - tl.where(offs == target, 1.0, 0.0)
            tl.store(row_start + offs, grad.to(LOGITS.dtype.element_ty), mask=in_row)

        tl.store(LOSSES + row, lse - target_logit)

    _jit_interpreted = interpreted(_cross_entropy_kernel)  # the mode @triton.jit chose at this import
else:  # pragma: no cover - depends on the environment
    _jit_interpreted = False


# ---------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------


def _launch_config(V: int, block_size: int | None = None) -> tuple[int, int, int]:
    """(BLOCK, num_warps, num_stages) for rows of V columns; compile_specs reports the same."""
    block = block_size or min(_MAX_BLOCK, triton.next_power_of_2(V))
    warps = min(8, max(1, block // 256))  # 8+ columns per thread and step
    return block, warps, 1


def compile_specs(dtype: str) -> list[dict]:
    """Each kernel of this module as a W1 training run launches it, for kernels/compile_report.py."""
    block, warps, stages = _launch_config(_W1_VOCAB)
    return [{
        "name": "cross_entropy",
        "fn": _cross_entropy_kernel,
        "signature": {"LOGITS": f"*{dtype}", "TARGETS": "*i64", "LOSSES": "*fp32", "stride_row": "i32",
                      "V": "i32", "BLOCK": "constexpr"},
        "constexprs": {"BLOCK": block},
        "num_warps": warps,
        "num_stages": stages,
        # contiguous [4096, 32000] logits: the pointers, the row stride and V (32000 = 16 x 2000)
        "divisible": ["LOGITS", "TARGETS", "LOSSES", "stride_row", "V"],
    }]


# ---------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------


def cross_entropy_available() -> tuple[bool, str]:
    """Whether the kernel can run here, and why (or why not)."""
    return triton_available(__name__, _jit_interpreted)


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor, block_size: int | None) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [n, V]; got shape {tuple(logits.shape)}")
    n, V = logits.shape
    if V == 0:
        raise ValueError("logits must have at least one column")
    if logits.dtype not in _DTYPES:
        raise ValueError(f"logits must be fp32, fp16 or bf16; got {logits.dtype}")
    if V > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits' rows must be contiguous (stride 1 along V); got strides {logits.stride()}")
    if n > 1 and logits.stride(0) < V:
        raise ValueError(f"logits' rows must not overlap (row stride >= V = {V}); got strides {logits.stride()}")
    if targets.shape != (n,) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 of shape [{n}]; got {targets.dtype} {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"targets ({targets.device}) and logits ({logits.device}) must be on one device")
    check_cuda("cross_entropy_", _jit_interpreted, logits)
    if block_size is not None and (block_size < 1 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be a power of two; got {block_size}")


def cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, *, block_size: int | None = None) -> torch.Tensor:
    """Per-row losses logsumexp(row) - row[target] in fp32, for logits [n, V] and targets [n].

    OVERWRITES ``logits`` with d(sum of losses)/d(logits) = softmax(row) - onehot(target),
    rounded to the logits' dtype. Targets must lie in [0, V) (not checked on the host: that
    would read the device; a row whose target is outside gets a NaN loss). ``block_size``:
    columns per step (a power of two), for tests; by default min(4096, next power of two of V).
    No autograd.
    """
    ok, why = cross_entropy_available()
    if not ok:
        raise RuntimeError(f"cross_entropy_ cannot run here: {why}")
    _check_inputs(logits, targets, block_size)
    n, V = logits.shape
    losses = torch.empty(n, device=logits.device, dtype=torch.float32)
    if n == 0:
        return losses
    targets = targets.contiguous()
    block, warps, stages = _launch_config(V, block_size)
    with on_device(logits):
        _cross_entropy_kernel[(n,)](logits, targets, losses, logits.stride(0), V, BLOCK=block,
                                    num_warps=warps, num_stages=stages,
                                    **({} if _jit_interpreted else {"enable_fp_fusion": True}))
    return losses
