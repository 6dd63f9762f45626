"""LoRA through PEFT, injected into the model in place (module names stay ours)."""

from __future__ import annotations

import torch.nn as nn

from sftplug.errors import SftplugError
from sftplug.model.lora_linear import use_merged_forward


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
