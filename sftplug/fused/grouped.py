"""The PyTorch form of ``grouped_linear``: one linear layer per expert over rows grouped by expert
(the call is in :mod:`sftplug.fused.op`), with an optional LoRA kept as its two factors.

It runs on ``torch._grouped_mm`` where the build has it for the device and dtype and the
sizes meet its 16-byte stride rule; otherwise it pads each group to the largest and runs one
batched matrix product. Either way no Python loop runs over the experts.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch


class Groups(NamedTuple):
    """Rows sorted by expert: ``ends`` int32 [E] the cumulative end row of each expert's group
    (an expert without rows repeats the previous end), ``expert`` int64 [M] each row's expert."""

    ends: torch.Tensor
    expert: torch.Tensor

    @classmethod
    def of(cls, sorted_experts: torch.Tensor, n_experts: int) -> Groups:
        """The groups of rows whose experts are ``sorted_experts`` (non-decreasing), without a device read."""
        counts = torch.zeros(n_experts, dtype=torch.int32, device=sorted_experts.device)
        counts.scatter_add_(0, sorted_experts, torch.ones_like(sorted_experts, dtype=torch.int32))
        return cls(counts.cumsum(0, dtype=torch.int32), sorted_experts)


def grouped_linear(x, groups: Groups, weight, bias=None, lora=None):
    """x [M, K] rows grouped by expert -> [M, N]: rows of expert e get x W_e^T + b_e + s (x A_e^T) B_e^T.

    ``weight`` [E, N, K] (any strides), ``bias`` [E, N] or None, ``lora`` None or
    (A [E, r, K], B [E, N, r], s). The LoRA is applied as its factors, never as W + s B A.
    """
    if torch.is_autocast_enabled(x.device.type):  # autocast does not reach torch._grouped_mm
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        lora = None if lora is None else (lora[0].to(dtype), lora[1].to(dtype), lora[2])
    y = _grouped_mm(x, weight, groups)  # its backward needs x and W, not y: the LoRA's sum goes in place
    if bias is not None:  # as transformers adds it (gpt-oss): under autocast an fp32 bias makes the sum fp32
        y = y + bias[groups.expert]
    if lora is not None:
        a, b, scale = lora
        u = _grouped_mm(x, a, groups) * scale  # [M, r]: scaled where it is small
        y = y.add_(_grouped_mm(u, b, groups))
    return y


def _grouped_mm(x, weight, groups: Groups):
    """x [M, K], weight [E, N, K] -> [M, N], each row times its expert's W^T."""
    if _fits_grouped_mm(x, weight):
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=groups.ends)
    return _padded_bmm(x, weight, groups)


def _fits_grouped_mm(x, weight) -> bool:
    per_row = 16 // x.element_size()  # torch._grouped_mm: strides of 16 bytes
    return (x.dtype == weight.dtype and x.shape[1] % per_row == 0 and weight.shape[1] % per_row == 0
            and _has_grouped_mm(x.device.type, x.dtype))


@functools.cache
def _has_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this build's torch._grouped_mm computes ``dtype`` on this kind of device (tried once)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.ones(4, 16, dtype=dtype, device=device_type)
        w = torch.ones(2, 16, 16, dtype=dtype, device=device_type)
        ends = torch.tensor([2, 4], dtype=torch.int32, device=device_type)
        return bool((torch._grouped_mm(x, w, offs=ends) == 16).all())
    except (RuntimeError, NotImplementedError):
        return False


def _padded_bmm(x, weight, groups: Groups):
    """Each group padded to the largest and one batched product: exact, for sizes _grouped_mm refuses."""
    n_experts = weight.shape[0]
    starts = torch.cat([groups.ends.new_zeros(1), groups.ends[:-1]]).long()
    slot = torch.arange(len(x), device=x.device) - starts[groups.expert]  # row's place in its group
    longest = int((groups.ends.long() - starts).max()) if len(x) else 0  # one device read
    padded = x.new_zeros(n_experts, longest, x.shape[1])
    padded = padded.index_put((groups.expert, slot), x)
    y = torch.bmm(padded, weight.transpose(1, 2).to(x.dtype))  # [E, longest, N]
    return y[groups.expert, slot]
