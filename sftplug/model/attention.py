"""The softmax attention token mixer: fused qkv, q/k norms, RoPE, queries scaled by position,
grouped-query heads, sliding windows, soft-capped scores, attention sinks; its generation cache
is a KV cache.

Attention itself is a pluggable backend (see sftplug.attention): the mixer computes q, k, v and
hands them over. Module names (qkv, o) are what LoRA targets.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sftplug.fused import pytorch
from sftplug.fused.op import OpSet
from sftplug.model.config import ModelConfig
from sftplug.model.norm import rms_norm_of


class KVCache:
    """Keys and values of the tokens generated so far, for one layer."""

    def __init__(self):
        self.k = self.v = None

    def append(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        options = config.attention
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # Qwen3.5 / Qwen3-Next: each query head's rows are followed by its output gate's
        self.gated = options.output_gate
        qkv_out = ((2 if self.gated else 1) * config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.qkv = nn.Linear(config.hidden_size, qkv_out, bias=options.qkv_bias)
        self.o = nn.Linear(config.n_heads * config.head_dim, config.hidden_size, bias=options.o_bias)
        # gpt-oss: a learned logit per query head joins each softmax's denominator (a key no query
        # can read a value from); trained with the rest, in the model's dtype
        self.sinks = nn.Parameter(torch.zeros(config.n_heads)) if options.sinks else None
        self.qk_norm = options.qk_norm
        if options.qk_norm:  # per head, or over the whole q and k projections
            per_head = options.qk_norm == "head"
            self.q_norm = rms_norm_of(config, config.head_dim if per_head else config.n_heads * config.head_dim)
            self.k_norm = rms_norm_of(config, config.head_dim if per_head else config.n_kv_heads * config.head_dim)
        self.uses_rope = config.rotary.applies_to(layer)
        self.window = options.window(layer)
        self.softcap, self.scale = options.softcap, options.scale or None
        self.backend = None  # set by Transformer.set_attention
        self.rope = pytorch.rope  # or a fused form (set_fused_ops)

    def forward(self, x, cos, sin, doc_ids=None, cache=None, query_scale=None):
        """``query_scale`` [B, 1, T, 1]: each query's scale after RoPE (Ministral 3: position_query_scale), or None."""
        b, t, _ = x.shape
        heads = [self.n_heads, self.n_kv_heads, self.n_kv_heads]
        qkv = self.qkv(x).view(b, t, -1, self.head_dim)  # [B, T, Hq + 2 Hkv, D] (2 Hq with gates)
        gate = None
        if self.gated:  # per head [q; gate]: the gates set aside, the output times their sigmoid
            q_and_gate, kv = qkv.split([2 * self.n_heads, 2 * self.n_kv_heads], dim=2)
            q, gate = q_and_gate.view(b, t, self.n_heads, 2, self.head_dim).unbind(3)
            qkv = torch.cat((q, kv), dim=2)
        if self.qk_norm:
            qkv = self.normed_qk(qkv, heads)
        if self.uses_rope:
            qkv = self.rope(qkv, cos, sin, self.n_heads + self.n_kv_heads)  # q and k rotated
        q, k, v = (z.transpose(1, 2) for z in qkv.split(heads, dim=2))  # [B, H, T, D]
        if query_scale is not None:
            q = q * query_scale.to(q.dtype)
        if cache is None:
            y = attend(self.backend, q, k, v, doc_ids, self.options(t))  # [B, Hq, T, D]
        else:  # generation: keys and values of earlier tokens come from the cache
            k, v = cache.append(k, v)  # [B, Hkv, T_past + T, D]
            y = cached_attention(q, k, v, self.window, self.softcap, self.scale, self.sinks)
        y = y.transpose(1, 2)  # [B, T, Hq, D]
        if gate is not None:
            y = y * torch.sigmoid(gate)
        return self.o(y.reshape(b, t, self.n_heads * self.head_dim))

    def normed_qk(self, qkv, heads):
        q, k, v = qkv.split(heads, dim=2)  # [B, T, H, D] each
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        else:  # over each token's whole projection
            q, k = self.q_norm(q.flatten(2)).view_as(q), self.k_norm(k.flatten(2)).view_as(k)
        return torch.cat((q, k, v), dim=2)

    def options(self, t: int) -> dict:
        """The backend's keyword options for rows of t tokens: only those this layer needs."""
        options = {}
        if self.window and self.window < t:  # a window at least as long as the row changes nothing
            options["window"] = self.window
        if self.softcap:
            options["softcap"] = self.softcap
        if self.scale is not None:
            options["scale"] = self.scale
        if self.sinks is not None:
            options["sinks"] = self.sinks
        return options

    def new_cache(self) -> KVCache:
        """The state generation keeps between calls: the keys and values so far."""
        return KVCache()

    def set_fused_ops(self, ops: OpSet) -> None:
        self.rope = ops.rope  # the q/k norms are RMSNorms, set with the model's others


def position_query_scale(positions, beta: float, period: int):
    """Llama 4's query scale at positions [B, T]: 1 + beta * log(1 + floor(position / period)), as
    [B, 1, T, 1] in fp32 (transformers' operations in its order). It grows by steps every ``period``
    positions; the positions restart with each packed document, as they do in a row of its own."""
    return (1 + beta * torch.log(1 + torch.floor(positions / period)))[:, None, :, None]


@torch.compiler.disable
def attend(backend, q, k, v, doc_ids, options):
    """Causal attention through the chosen backend, never traced by torch.compile.

    The kernels are fused already, and a packed batch's plan (documents grouped by length)
    has data-dependent shapes that would recompile the block at every update.
    """
    return backend(q, k, v, causal=True, doc_ids=doc_ids, **options)


def cached_attention(q, k, v, window: int = 0, softcap: float = 0.0, scale: float | None = None, sinks=None):
    """Generation's attention: q [B, Hq, t, D] are the last t of the T positions in k, v [B, Hkv, T, D].

    ``sinks`` [Hq] (or None): each head's logit in the softmax's denominator only.
    """
    t, total = q.shape[2], k.shape[2]
    if not (window or softcap or sinks is not None):  # prefill (t = T) or one new token: SDPA's causal mask is right
        return F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    wide = torch.promote_types(q.dtype, torch.float32)  # the softmax in fp32 at least
    scores = (q.to(wide) @ k.to(wide).transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5)  # [B, Hq, t, T]
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    query_at = torch.arange(total - t, total, device=q.device)[:, None]
    key_at = torch.arange(total, device=q.device)[None, :]
    allowed = (key_at <= query_at) & ((key_at > query_at - window) if window else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is None:
        probs = scores.softmax(-1)
    else:  # the sink is one more logit in the softmax, whose probability multiplies no value
        sink = sinks.to(wide)[None, :, None, None].expand(*scores.shape[:3], 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    return (probs @ v.to(wide)).to(q.dtype)
