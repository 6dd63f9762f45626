"""LoRA through PEFT, injected into the model in place (module names stay ours).

Each PEFT LoRA linear layer is computed as one matmul with the merged weight W + s·B·A.
PEFT computes ``x W^T + s (x A^T) B^T``: besides the base matmul, two skinny matmuls and a
full-size add in forward, three skinny matmuls and another add in backward. With the
frozen W this equals ``x (W + s B A)^T``, and the input gradient ``dy (W + s B A)``
includes the LoRA path for free, so only the gradients of A and B need skinny matmuls. The
merged weight is built again in backward rather than kept (it is as large as W).

Used when it is exact: one plain LoRA adapter, no dropout (or eval), not merged, frozen
base; anything else goes through PEFT's own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from sftplug.errors import SftplugError


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float, targets) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(targets) - names)
    if unknown:
        raise SftplugError(
            f"--lora-targets: no linear layer named {', '.join(unknown)}; this model has {', '.join(sorted(names))}"
        )
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    model = inject_adapter_in_model(config, model)
    for module in model.modules():  # PEFT gives adapters the base's dtype; they train in fp32
        if hasattr(module, "lora_A"):
            module.lora_A.float()
            module.lora_B.float()
    model.lora_config = config
    use_merged_forward(model)
    return model


def lora_settings(model: nn.Module) -> dict | None:
    config = getattr(model, "lora_config", None)
    if config is None:
        return None
    return {
        "r": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "targets": sorted(config.target_modules),
    }


def trainable_state_dict(model: nn.Module) -> dict:
    """The weights a checkpoint must keep: the adapter for LoRA, else every parameter."""
    if getattr(model, "lora_config", None) is not None:
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    weights = {n: t.detach() for n, t in model.state_dict().items()}
    if model.config.tie_embeddings:  # one tensor under two names; safetensors keeps it once
        weights.pop("lm_head.weight", None)
    return weights


def lm_head_weight(model: nn.Module):
    """The LM head's effective weight, a LoRA on the head (PEFT) included."""
    head = model.lm_head
    if not hasattr(head, "lora_A"):
        return head.weight
    weight = head.base_layer.weight
    for name in head.active_adapters:
        if name in head.lora_A:
            weight = weight + (head.lora_B[name].weight @ head.lora_A[name].weight) * head.scaling[name]
    return weight


# -- the merged forward ---------------------------------------------------------------


class MergedLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):  # the caller chose the compute dtype
            x = x.to(dtype)
            u = x @ lora_a.to(dtype).t()  # [..., r], kept for the gradient of B
            bias = None if bias is None else bias.to(dtype)
            y = F.linear(x, merged_weight(weight, lora_a, lora_b, scale, dtype), bias)
        ctx.save_for_backward(x, u, weight, lora_a, lora_b)
        ctx.scale, ctx.dtype = scale, dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, weight, lora_a, lora_b = ctx.saved_tensors
        scale, dtype = ctx.scale, ctx.dtype
        dy = dy.to(dtype)
        dx = dy @ merged_weight(weight, lora_a, lora_b, scale, dtype) if ctx.needs_input_grad[0] else None
        dy2, x2, u2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), u.reshape(-1, u.shape[-1])
        grad_b = (dy2.t() @ u2).mul_(scale).to(lora_b.dtype)  # [out, r]
        grad_a = ((dy2 @ lora_b.to(dtype)).t() @ x2).mul_(scale).to(lora_a.dtype)  # [r, in]
        return dx, None, None, grad_a, grad_b, None, None


def merged_weight(weight, lora_a, lora_b, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """W + scale·B·A in the compute dtype: one addmm (products accumulated in fp32, one rounding),
    so a bf16 run makes no weight-sized fp32 temporaries."""
    return torch.addmm(weight.to(dtype), lora_b.to(dtype), lora_a.to(dtype), alpha=scale)


def use_merged_forward(model: nn.Module) -> None:
    """Route every PEFT LoRA linear of ``model`` through MergedLoRALinear where it is exact."""
    for module in model.modules():
        if hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), nn.Linear):
            module.forward = types.MethodType(_forward, module)


def _forward(self, x, *args, **kwargs):
    adapter = _single_plain_adapter(self)
    if adapter is None or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own
    base = self.base_layer
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    return MergedLoRALinear.apply(x, base.weight, base.bias, a, b, float(self.scaling[adapter]), dtype)


def _single_plain_adapter(layer) -> str | None:
    """The one active vanilla LoRA adapter when merging is exact for it, else None."""
    if layer.disable_adapters or layer.merged or layer.base_layer.weight.requires_grad:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    dropout = layer.lora_dropout[active[0]]
    if not isinstance(dropout, nn.Identity) and layer.training:
        return None
    return active[0]
