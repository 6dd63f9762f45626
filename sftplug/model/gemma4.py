"""Gemma 4's block (gemma4_text), as transformers defines it.

Its attention keeps q, k and v apart (their shapes differ by layer): per-head q/k norms and a
v norm without a scale, a softmax scale of 1, and the full-attention layers' own head_dim and
key/value heads, their values being their keys where ``full_k_eq_v``. The last
``kv_shared_layers`` layers compute only queries: they reuse the keys and values of the last
earlier layer of their kind (full or sliding), passed from block to block in one dict per
forward (with activation checkpointing the consumer's gradient reaches the producer through
the tensors themselves; in generation the producer's cache holds them). Each block ends with
its per-layer input (sftplug.model.per_layer_inputs) and a stored scalar times the whole stream.
Where ``enable_moe_block``, experts run beside each MLP (sftplug.model.gemma4_moe).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sftplug.fused import pytorch
from sftplug.fused.op import OpSet
from sftplug.model.attention import KVCache, attend, cached_attention
from sftplug.model.config import ModelConfig
from sftplug.model.feed_forward import MLP
from sftplug.model.gemma4_moe import Gemma4MoE
from sftplug.model.norm import rms_norm_of
from sftplug.model.per_layer_inputs import LayerInput

ARCHITECTURE = "gemma4_text"


def is_gemma4(config: ModelConfig) -> bool:
    return config.architecture == ARCHITECTURE


def is_full(config: ModelConfig, layer: int) -> bool:
    """A full-attention layer (else a sliding-window one)."""
    return not config.attention.window(layer)


def head_shape(config: ModelConfig, layer: int) -> tuple[int, int]:
    """The layer's head_dim and key/value heads: the full-attention layers' own where set."""
    o = config.gemma4
    if is_full(config, layer):
        return o.full_head_dim or config.head_dim, o.full_kv_heads or config.n_kv_heads
    return config.head_dim, config.n_kv_heads


def first_shared_layer(config: ModelConfig) -> int:
    return config.n_layers - config.gemma4.kv_shared_layers


def kv_source(config: ModelConfig, layer: int) -> int | None:
    """The layer whose keys and values this one reuses (the last earlier non-sharing layer of its kind), or None."""
    first = first_shared_layer(config)
    if layer < first:
        return None
    same_kind = [i for i in range(first) if is_full(config, i) == is_full(config, layer)]
    if not same_kind:
        raise ValueError(f"layer {layer} shares the keys and values of an earlier layer of its kind, but the first "
                         f"{first} layers have none")
    return same_kind[-1]


def mlp_size(config: ModelConfig, layer: int) -> int:
    """The MLP's intermediate size: twice as wide in the layers that share keys and values (use_double_wide_mlp)."""
    wide = config.gemma4.double_wide_shared_mlp and layer >= first_shared_layer(config)
    return config.intermediate_size * (2 if wide else 1)


class Gemma4Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, hidden = config.n_heads, config.hidden_size
        self.head_dim, self.n_kv_heads = head_shape(config, layer)
        self.full, self.window = is_full(config, layer), config.attention.window(layer)
        self.reuses_kv = kv_source(config, layer) is not None
        self.stores_kv = layer in {kv_source(config, i) for i in range(config.n_layers)}
        self.q = nn.Linear(hidden, self.n_heads * self.head_dim, bias=False)
        self.q_norm = rms_norm_of(config, self.head_dim)
        if not self.reuses_kv:
            kv = self.n_kv_heads * self.head_dim
            self.k = nn.Linear(hidden, kv, bias=False)
            self.v = None if self.full and config.gemma4.full_k_eq_v else nn.Linear(hidden, kv, bias=False)
            self.k_norm = rms_norm_of(config, self.head_dim)
        self.o = nn.Linear(self.n_heads * self.head_dim, hidden, bias=False)
        self.eps, self.scale = config.norm.eps, config.attention.scale or None
        self.backend = None  # set by Transformer.set_attention
        self.rope = pytorch.rope  # or a fused form (set_fused_ops)

    def forward(self, x, cos, sin, doc_ids=None, cache=None, shared_kv=None):
        """``shared_kv``: this forward's {full?: (k, v)}, which a storing layer fills and a reusing one reads."""
        b, t, _ = x.shape
        q = self.rope(self.q_norm(self.q(x).view(b, t, self.n_heads, self.head_dim)), cos, sin, self.n_heads)
        q = q.transpose(1, 2)  # [B, Hq, T, D]
        if self.reuses_kv:
            k, v = shared_kv[self.full]
        else:
            k, v = self.keys_and_values(x, cos, sin)
            if cache is not None:  # generation: keys and values of earlier tokens come from the cache
                k, v = cache.append(k, v)
        if self.stores_kv:
            shared_kv[self.full] = k, v
        if cache is None:
            y = attend(self.backend, q, k, v, doc_ids, self.options(t))
        else:
            y = cached_attention(q, k, v, self.window, 0.0, self.scale)
        return self.o(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def keys_and_values(self, x, cos, sin):
        """k (normed, rotated) and v (normed without a scale) [B, Hkv, T, D]; v is k's projection where k_eq_v."""
        b, t, _ = x.shape
        shape = (b, t, self.n_kv_heads, self.head_dim)
        k = self.k(x).view(shape)
        v = k if self.v is None else self.v(x).view(shape)
        k = self.rope(self.k_norm(k), cos, sin, self.n_kv_heads)
        return k.transpose(1, 2), rms_normalized(v, self.eps).transpose(1, 2)

    def options(self, t: int) -> dict:
        """The backend's keyword options for rows of t tokens: only those this layer needs."""
        options = {"window": self.window} if self.window and self.window < t else {}
        if self.scale is not None:
            options["scale"] = self.scale
        return options

    def new_cache(self) -> KVCache:
        return KVCache()  # a reusing layer's stays empty: it reads its source's

    def set_fused_ops(self, ops: OpSet) -> None:
        self.rope = ops.rope  # the q/k norms are RMSNorms, set with the model's others


def rms_normalized(x, eps: float):
    """RMSNorm without a scale, in fp32 (Gemma 4's v_norm)."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Gemma4Block(nn.Module):
    """x + norm(attn(norm(x))), then x + norm(mlp(norm(x))), then the per-layer input; all times layer_scalar."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm, self.attn, self.attn_post_norm = rms_norm_of(config), Gemma4Attention(config, layer), \
            rms_norm_of(config)
        self.mlp_norm, self.mlp_post_norm = rms_norm_of(config), rms_norm_of(config)
        # enable_moe_block: the MLP and the experts side by side (sftplug.model.gemma4_moe)
        self.moe = config.has_experts
        self.mlp = (Gemma4MoE if self.moe else MLP)(config, mlp_size(config, layer))
        self.layer_input = LayerInput(config) if config.gemma4.per_layer_input_size else None
        self.register_buffer("layer_scalar", torch.ones(1))  # stored with the weights, not trained

    def forward(self, x, cos, sin, doc_ids=None, cache=None, layer_input=None, shared_kv=None):
        x = x + self.attn_post_norm(self.attn(self.attn_norm(x), cos, sin, doc_ids, cache, shared_kv))
        normed = self.mlp_norm(x)
        x = x + self.mlp_post_norm(self.mlp(normed, x) if self.moe else self.mlp(normed))
        if self.layer_input is not None:
            x = self.layer_input(x, layer_input)
        return x * self.layer_scalar

    def new_cache(self) -> KVCache:
        return self.attn.new_cache()


def block_inputs(model, input_ids, embeddings) -> list[dict]:
    """Each Gemma 4 block's keyword inputs beyond x: its per-layer input and this forward's shared keys/values."""
    shared_kv: dict = {}
    per_layer = None if model.per_layer_inputs is None else model.per_layer_inputs(input_ids, embeddings)
    return [{"layer_input": None if per_layer is None else per_layer[:, :, i], "shared_kv": shared_kv}
            for i in range(len(model.layers))]
