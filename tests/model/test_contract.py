"""sftplug's own model keeps the model contract it documents for third-party ones."""

import inspect

import torch

from sftplug.model.contract import DecoderModel
from sftplug.model.transformer import ModelConfig, Transformer

METHODS = ["forward", "set_attention", "attention_options", "set_fused_ops"]


def test_the_transformer_keeps_the_contract_with_the_same_signatures():
    model = Transformer(ModelConfig.preset("tiny"))
    assert isinstance(model, DecoderModel)
    for name in METHODS:
        ours = inspect.signature(getattr(Transformer, name)).parameters
        contract = inspect.signature(getattr(DecoderModel, name)).parameters
        assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in contract.values()], name


def test_a_module_without_the_hooks_for_kernels_does_not():
    plain = torch.nn.Linear(2, 2)
    plain.config, plain.layers, plain.lm_head, plain.checkpoint_blocks = None, torch.nn.ModuleList(), plain, False
    assert not isinstance(plain, DecoderModel)
