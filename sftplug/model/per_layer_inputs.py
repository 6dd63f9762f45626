"""Gemma 4's per-layer inputs (PLE): besides the token embedding, each layer gets a small input of
its own, made once per forward from a second embedding table and a projection of the token
embeddings; each block gates it with its output and adds its projection to the residual stream."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sftplug.model.config import ModelConfig
from sftplug.model.norm import rms_norm_of


class PerLayerInputs(nn.Module):
    """Every layer's input [B, T, layers, P]: (norm(projection of the embeddings) + its own embedding) / sqrt(2)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layers, self.size = config.n_layers, config.gemma4.per_layer_input_size
        self.embed = nn.Embedding(config.gemma4.per_layer_input_vocab, self.layers * self.size)
        self.projection = nn.Linear(config.hidden_size, self.layers * self.size, bias=False)
        self.norm = rms_norm_of(config, self.size)
        self.projection_scale = config.hidden_size ** -0.5

    def forward(self, input_ids, embeddings):
        """input_ids [B, T] and the model's scaled token embeddings [B, T, C] -> [B, T, layers, P]."""
        shape = (*input_ids.shape, self.layers, self.size)
        own = self.embed(input_ids)
        own = own * torch.tensor(self.size ** 0.5, dtype=own.dtype, device=own.device)  # rounded as HF rounds it
        context = self.norm((self.projection(embeddings) * self.projection_scale).view(shape))
        return (context + own.view(shape)) * 2 ** -0.5


class LayerInput(nn.Module):
    """A block's use of its input: x + norm(projection(act(gate(x)) * input))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        size = config.gemma4.per_layer_input_size
        self.gate = nn.Linear(config.hidden_size, size, bias=False)
        self.projection = nn.Linear(size, config.hidden_size, bias=False)
        self.norm = rms_norm_of(config)
        self.activation = config.feed_forward.activation

    def forward(self, x, layer_input):
        return x + self.norm(self.projection(activated(self.gate(x), self.activation) * layer_input))


def activated(x, activation: str):
    """The MLP's activation (sftplug.fused.pytorch.ACTIVATIONS) on its own."""
    return F.silu(x) if activation == "silu" else F.gelu(x, approximate="tanh")
