"""LoRA layers computed as one matmul with the merged weight W + s·B·A.

PEFT computes ``x W^T + s (x A^T) B^T``: besides the base matmul, two skinny matmuls and a
full-size add in forward, three skinny matmuls and another add in backward. With the
frozen W this equals ``x (W + s B A)^T``, and the input gradient ``dy (W + s B A)``
includes the LoRA path for free, so only the gradients of A and B need skinny matmuls. The
merged weight is built again in backward rather than kept (it is as large as W).

Used when it is exact: one plain LoRA adapter, no dropout (or eval), not merged, frozen
base; anything else goes through PEFT's own forward (with dropout, per projection of a fused
layer, as sftplug.model.lora stacks them).
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from sftplug.model.quantize import dense_weight


class MergedLoRALinear(torch.autograd.Function):
    """y = x (W + scale·B·A)^T + bias in ``dtype``; gradients for x, A and B (W is frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, dtype: torch.dtype, state=None):
        with torch.autocast(x.device.type, enabled=False):  # the caller chose the compute dtype
            x = x.to(dtype)
            u = x @ lora_a.to(dtype).t()  # [..., r], kept for the gradient of B
            bias = None if bias is None else bias.to(dtype)
            y = F.linear(x, merged_weight(weight, lora_a, lora_b, scale, dtype, state), bias)
        ctx.save_for_backward(x, u, lora_a, lora_b)
        ctx.weight, ctx.scale, ctx.dtype = weight, scale, dtype  # the frozen (maybe 4-bit) weight itself, not saved
        ctx.state = state
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, lora_a, lora_b = ctx.saved_tensors
        weight, scale, dtype = ctx.weight, ctx.scale, ctx.dtype
        dy = dy.to(dtype)
        dx = dy @ merged_weight(weight, lora_a, lora_b, scale, dtype, ctx.state) if ctx.needs_input_grad[0] else None
        dy2, x2, u2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), u.reshape(-1, u.shape[-1])
        grad_b = (dy2.t() @ u2).mul_(scale).to(lora_b.dtype)  # [out, r]
        grad_a = ((dy2 @ lora_b.to(dtype)).t() @ x2).mul_(scale).to(lora_a.dtype)  # [r, in]
        return dx, None, None, grad_a, grad_b, None, None, None


def merged_weight(weight, lora_a, lora_b, scale: float, dtype: torch.dtype, state=None) -> torch.Tensor:
    """W + scale·B·A in the compute dtype: one addmm (products accumulated in fp32, one rounding),
    so a bf16 run makes no weight-sized fp32 temporaries. A 4-bit W (QLoRA) is dequantized here,
    in forward and again in backward (``state``: its QuantState, when FSDP holds it as plain bytes)."""
    return torch.addmm(dense_weight(weight, dtype, state), lora_b.to(dtype), lora_a.to(dtype), alpha=scale)


def use_merged_forward(model: nn.Module) -> None:
    """Route every PEFT LoRA linear of ``model`` through MergedLoRALinear where it is exact."""
    for module in model.modules():
        if hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), nn.Linear):
            module.forward = types.MethodType(_forward, module)


def _forward(self, x, *args, **kwargs):
    adapter = _single_plain_adapter(self)
    if adapter is None or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own
    if self.training and not isinstance(self.lora_dropout[adapter], nn.Identity):
        return _forward_with_dropout(self, x, adapter)
    base = self.base_layer
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    return MergedLoRALinear.apply(x, base.weight, base.bias, a, b, float(self.scaling[adapter]), dtype,
                                  getattr(base, "quant_state", None))


def _forward_with_dropout(self, x, adapter: str):
    """PEFT's LoRA forward with one dropout mask per projection, drawn in HF's order (q, k, v), as
    PEFT's separate layers draw them."""
    result = self.base_layer(x)
    a, b, dropout = self.lora_A[adapter].weight, self.lora_B[adapter], self.lora_dropout[adapter]
    x = self._cast_input_dtype(x, a.dtype)
    parts = getattr(self, "lora_parts", (None,))
    r = a.shape[0] // len(parts)
    u = torch.cat([F.linear(dropout(x), a[i * r:(i + 1) * r]) for i in range(len(parts))], dim=-1)
    return (result + b(u) * self.scaling[adapter]).to(result.dtype)


def _single_plain_adapter(layer) -> str | None:
    """The one active vanilla LoRA adapter of a frozen, unmerged base layer, else None."""
    if layer.disable_adapters or layer.merged or layer.base_layer.weight.requires_grad:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    return active[0]
