"""A Llama-family decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, fused qkv.

Attention itself is a pluggable backend (see sftplug.attention): the model computes
q, k, v and hands them over. Module names (qkv, o, gate_up, down) are what LoRA targets.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from sftplug.fused import pytorch
from sftplug.fused.op import OpSet


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 688
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // n_heads
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3.1 style {"rope_type": "llama3", ...}
    rms_norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    init_std: float = 0.02
    architecture: str = "llama"
    extra: dict = field(default_factory=dict)  # source config fields kept for export

    def __post_init__(self):
        if self.head_dim == 0:
            if self.hidden_size % self.n_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of n_heads {self.n_heads}")
            self.head_dim = self.hidden_size // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise KeyError(name)
        return cls(**PRESETS[name])

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # The built-in default: small enough to fine-tune on 2 CPU cores in a minute or two.
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=688, n_layers=4, n_heads=4, n_kv_heads=2),
    # Benchmark shapes from DESIGN.md.
    "w0": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, n_layers=6, n_heads=8, n_kv_heads=4),
    "w1": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, n_layers=22, n_heads=32, n_kv_heads=4),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.op = pytorch.rmsnorm  # or a fused form (Transformer.set_fused_ops)

    def forward(self, x):
        return self.op(x, self.weight, self.eps, False)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: llama3, linear)")
    return inv_freq.float()


def _llama3_scaled(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low, old_len / high
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(middle, smoothed, out)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        qkv_out = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.qkv = nn.Linear(config.hidden_size, qkv_out, bias=config.qkv_bias)
        self.o = nn.Linear(config.n_heads * config.head_dim, config.hidden_size, bias=False)
        self.backend = None  # set by Transformer.set_attention
        self.rope = pytorch.rope  # or a fused form (Transformer.set_fused_ops)

    def forward(self, x, cos, sin, doc_ids=None, cache=None):
        b, t, _ = x.shape
        heads = [self.n_heads, self.n_kv_heads, self.n_kv_heads]
        qkv = self.qkv(x).view(b, t, sum(heads), self.head_dim)  # [B, T, Hq + 2 Hkv, D]
        qkv = self.rope(qkv, cos, sin, self.n_heads + self.n_kv_heads)  # q and k rotated
        q, k, v = (z.transpose(1, 2) for z in qkv.split(heads, dim=2))  # [B, H, T, D]
        if cache is None:
            y = attend(self.backend, q, k, v, doc_ids)  # [B, Hq, T, D]
        else:  # generation: keys and values of earlier tokens come from the cache
            k, v = cache.append(k, v)  # [B, Hkv, T_past + T, D]
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


@torch.compiler.disable
def attend(backend, q, k, v, doc_ids):
    """Causal attention through the chosen backend, never traced by torch.compile.

    The kernels are fused already, and a packed batch's plan (documents grouped by length)
    has data-dependent shapes that would recompile the block at every update.
    """
    return backend(q, k, v, causal=True, doc_ids=doc_ids)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.glu = pytorch.glu  # or a fused form (Transformer.set_fused_ops)

    def forward(self, x):
        return self.down(self.glu(self.gate_up(x), "silu"))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, doc_ids=None, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, doc_ids, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.checkpoint_blocks = False  # activation checkpointing (--grad-ckpt)

    def init_weights(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=generator) * self.config.init_std)
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)

    def set_attention(self, backend) -> None:
        for block in self.layers:
            block.attn.backend = backend

    def attention_options(self, seq_len: int = 0) -> dict:
        """The attention request's options (sftplug.attention.AttentionRequest) this model needs
        for rows of ``seq_len`` (0: unknown): none for a Llama-family model."""
        return {}

    def set_fused_ops(self, ops: OpSet) -> None:
        """Compute RMSNorm, the gated MLP and RoPE with these forms (the loss takes ops.cross_entropy)."""
        for norm in [self.norm, *(n for block in self.layers for n in (block.attn_norm, block.mlp_norm))]:
            norm.op = ops.rmsnorm
        for block in self.layers:
            block.attn.rope = ops.rope
            block.mlp.glu = ops.glu

    def rope(self, positions, dtype):
        # positions: [B, T] -> cos, sin: [B, T, 1, D/2]
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, D/2]
        freqs = freqs[:, :, None, :]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def hidden_states(self, input_ids, positions=None, doc_ids=None, caches=None):
        """Final-norm hidden states [B, T, C] for input_ids [B, T]; caches: one generate.KVCache per layer."""
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        x = self.embed_tokens(input_ids)  # [B, T, C]
        if doc_ids is not None and not getattr(self.layers[0].attn.backend, "host_doc_ids", False):
            doc_ids = doc_ids.to(x.device, non_blocking=True)  # once for every layer
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cos, sin = self.rope(positions, dtype)
        for i, block in enumerate(self.layers):
            if caches is not None:
                x = block(x, cos, sin, cache=caches[i])
            elif self.checkpoint_blocks and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, doc_ids, use_reentrant=False)
            else:
                x = block(x, cos, sin, doc_ids)
        return self.norm(x)

    def forward(self, input_ids, positions=None, doc_ids=None, hidden_only: bool = False, caches=None):
        """Logits [B, T, vocab] for input_ids [B, T]; the final hidden states with ``hidden_only``.

        Training asks for hidden states (its loss applies the LM head to target positions
        only) and generation passes its KV caches through forward, so wrappers that hook
        forward (FSDP, DDP) see every call.
        """
        hidden = self.hidden_states(input_ids, positions, doc_ids, caches)
        return hidden if hidden_only else self.lm_head(hidden)
