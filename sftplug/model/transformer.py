"""A Llama-family decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, fused qkv.

The options of the other dense families (Qwen3, Gemma 2/3, Phi-3/4, OLMo 2, SmolLM3,
Granite, sliding windows) are fields of :class:`ModelConfig`, each off by default.
Attention itself is a pluggable backend (see sftplug.attention): the model computes
q, k, v and hands them over. Module names (qkv, o, gate_up, down) are what LoRA targets.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from sftplug.errors import SftplugError
from sftplug.fused import pytorch
from sftplug.fused.op import OpSet
from sftplug.model.offload import ActivationOffloader


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
    # The other families' options (sftplug.hf.config sets them from config.json); off by default.
    layer_windows: tuple[int, ...] = ()  # each layer's sliding window, 0 for full attention; (): none
    rotary_dim: int = 0  # dims of each head RoPE rotates (partial_rotary_factor); 0: head_dim
    rope_local_theta: float = 0.0  # RoPE base of the sliding-window layers (Gemma 3); 0: rope_theta
    rope_layers: tuple[bool, ...] = ()  # which layers apply RoPE (SmolLM3 has layers without); (): all
    qk_norm: str = ""  # RMSNorm of q and k: "head" per head (Qwen3, Gemma 3), "projection" whole (OLMo 2)
    norms: str = "pre"  # "pre" (Llama), "sandwich": before and after attention and MLP (Gemma), "post" (OLMo 2)
    gemma_norm: bool = False  # RMSNorm as (1 + w) * x in fp32 (Gemma)
    activation: str = "silu"  # the gated MLP's: silu (SwiGLU) or gelu_tanh (GeGLU, Gemma)
    embed_scale: float = 1.0  # embeddings times this (Gemma: sqrt(hidden); Granite: embedding_multiplier)
    residual_scale: float = 1.0  # attention and MLP outputs times this before the residual add (Granite)
    attn_scale: float = 0.0  # softmax scale; 0: head_dim ** -0.5 (Gemma's query_pre_attn_scalar, Granite)
    attn_softcap: float = 0.0  # attention scores soft-capped at this (Gemma 2); 0: none
    logit_scale: float = 1.0  # logits divided by this (Granite's logits_scaling)
    logit_softcap: float = 0.0  # logits soft-capped at this (Gemma 2's final_logit_softcapping); 0: none

    def __post_init__(self):
        if self.head_dim == 0:
            if self.hidden_size % self.n_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of n_heads {self.n_heads}")
            self.head_dim = self.hidden_size // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        self.rotary_dim = self.rotary_dim or self.head_dim
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary dims {self.rotary_dim} must be even and at most head_dim {self.head_dim}")
        self.layer_windows, self.rope_layers = tuple(self.layer_windows), tuple(self.rope_layers)
        for name in ("layer_windows", "rope_layers"):
            if len(getattr(self, name)) not in (0, self.n_layers):
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {self.n_layers} layers")
        choices = {"qk_norm": ("", "head", "projection"), "norms": ("pre", "sandwich", "post"),
                   "activation": pytorch.ACTIVATIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(map(repr, allowed))}")

    def window(self, layer: int) -> int:
        return self.layer_windows[layer] if self.layer_windows else 0

    def uses_rope(self, layer: int) -> bool:
        return self.rope_layers[layer] if self.rope_layers else True

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
    def __init__(self, dim: int, eps: float, gemma: bool = False):
        super().__init__()
        self.eps, self.gemma = eps, gemma
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))  # Gemma's scales by 1 + w
        self.op = pytorch.rmsnorm  # or a fused form (Transformer.set_fused_ops)

    def forward(self, x):
        return self.op(x, self.weight, self.eps, self.gemma)


def rms_norm_of(config: ModelConfig, dim: int | None = None) -> RMSNorm:
    return RMSNorm(dim or config.hidden_size, config.rms_norm_eps, config.gemma_norm)


def rope_inv_freq(config: ModelConfig, local: bool = False) -> torch.Tensor:
    """Each rotated pair's frequency; ``local``: the sliding-window layers' (Gemma 3: their own base, unscaled)."""
    d = config.rotary_dim
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = {} if local else config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "longrope":  # rows up to original_max_position_embeddings: the short factors (Phi-3/4)
        inv_freq = inv_freq / torch.tensor(scaling["short_factor"], dtype=torch.float64)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: llama3, linear, longrope)")
    return inv_freq.float()


def rope_attention_factor(config: ModelConfig) -> float:
    """LongRoPE scales cos and sin by this (1 for every other kind)."""
    scaling = config.rope_scaling or {}
    return float(scaling.get("attention_factor", 1.0)) if scaling.get("rope_type") == "longrope" else 1.0


def rope_longest_rows(config: ModelConfig) -> int | None:
    """The longest rows RoPE is computed for exactly (LongRoPE switches factors beyond), or None."""
    scaling = config.rope_scaling or {}
    return scaling.get("original_max_position_embeddings") if scaling.get("rope_type") == "longrope" else None


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
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        qkv_out = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.qkv = nn.Linear(config.hidden_size, qkv_out, bias=config.qkv_bias)
        self.o = nn.Linear(config.n_heads * config.head_dim, config.hidden_size, bias=False)
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # per head, or over the whole q and k projections
            per_head = config.qk_norm == "head"
            self.q_norm = rms_norm_of(config, config.head_dim if per_head else config.n_heads * config.head_dim)
            self.k_norm = rms_norm_of(config, config.head_dim if per_head else config.n_kv_heads * config.head_dim)
        self.uses_rope = config.uses_rope(layer)
        self.window = config.window(layer)
        self.softcap, self.scale = config.attn_softcap, config.attn_scale or None
        self.backend = None  # set by Transformer.set_attention
        self.rope = pytorch.rope  # or a fused form (Transformer.set_fused_ops)

    def forward(self, x, cos, sin, doc_ids=None, cache=None):
        b, t, _ = x.shape
        heads = [self.n_heads, self.n_kv_heads, self.n_kv_heads]
        qkv = self.qkv(x).view(b, t, sum(heads), self.head_dim)  # [B, T, Hq + 2 Hkv, D]
        if self.qk_norm:
            qkv = self.normed_qk(qkv, heads)
        if self.uses_rope:
            qkv = self.rope(qkv, cos, sin, self.n_heads + self.n_kv_heads)  # q and k rotated
        q, k, v = (z.transpose(1, 2) for z in qkv.split(heads, dim=2))  # [B, H, T, D]
        if cache is None:
            y = attend(self.backend, q, k, v, doc_ids, self.options(t))  # [B, Hq, T, D]
        else:  # generation: keys and values of earlier tokens come from the cache
            k, v = cache.append(k, v)  # [B, Hkv, T_past + T, D]
            y = cached_attention(q, k, v, self.window, self.softcap, self.scale)
        return self.o(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

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
        return options


@torch.compiler.disable
def attend(backend, q, k, v, doc_ids, options):
    """Causal attention through the chosen backend, never traced by torch.compile.

    The kernels are fused already, and a packed batch's plan (documents grouped by length)
    has data-dependent shapes that would recompile the block at every update.
    """
    return backend(q, k, v, causal=True, doc_ids=doc_ids, **options)


def cached_attention(q, k, v, window: int = 0, softcap: float = 0.0, scale: float | None = None):
    """Generation's attention: q [B, Hq, t, D] are the last t of the T positions in k, v [B, Hkv, T, D]."""
    t, total = q.shape[2], k.shape[2]
    if not (window or softcap):  # prefill (t = T) or one new token: SDPA's causal mask is right
        return F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q.float() @ k.float().transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5)  # [B, Hq, t, T]
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    query_at = torch.arange(total - t, total, device=q.device)[:, None]
    key_at = torch.arange(total, device=q.device)[None, :]
    allowed = (key_at <= query_at) & ((key_at > query_at - window) if window else True)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ v.float()).to(q.dtype)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.activation = config.activation
        self.glu = pytorch.glu  # or a fused form (Transformer.set_fused_ops)

    def forward(self, x):
        return self.down(self.glu(self.gate_up(x), self.activation))


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); Gemma also norms each output, OLMo 2 only the outputs."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        before, after = config.norms != "post", config.norms != "pre"
        self.attn_norm = rms_norm_of(config) if before else None
        self.attn = Attention(config, layer)
        self.attn_post_norm = rms_norm_of(config) if after else None
        self.mlp_norm = rms_norm_of(config) if before else None
        self.mlp = MLP(config)
        self.mlp_post_norm = rms_norm_of(config) if after else None
        self.residual_scale = config.residual_scale

    def forward(self, x, cos, sin, doc_ids=None, cache=None):
        x = x + self.scaled(_normed(self.attn_post_norm, self.attn(_normed(self.attn_norm, x), cos, sin, doc_ids,
                                                                     cache)))
        return x + self.scaled(_normed(self.mlp_post_norm, self.mlp(_normed(self.mlp_norm, x))))

    def scaled(self, h):
        return h if self.residual_scale == 1.0 else h * self.residual_scale


def _normed(norm, x):
    return x if norm is None else norm(x)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = rms_norm_of(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        if config.rope_local_theta:
            self.register_buffer("inv_freq_local", rope_inv_freq(config, local=True), persistent=False)
        self.checkpoint_blocks = False  # activation checkpointing (--grad-ckpt)
        self.offload_activations = False  # saved activations kept in CPU memory (--offload-activations)
        self.offloader = None  # its sftplug.model.offload.ActivationOffloader, made at the first such forward

    def init_weights(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.zeros_(p) if self.config.gemma_norm else nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=generator) * self.config.init_std)
        self.reset_rope(self.inv_freq.device)

    def reset_rope(self, device) -> None:
        """Compute the RoPE frequencies (non-persistent fp32 buffers, never loaded) on ``device``."""
        self.inv_freq = rope_inv_freq(self.config).to(device)
        if self.config.rope_local_theta:
            self.inv_freq_local = rope_inv_freq(self.config, local=True).to(device)

    def set_attention(self, backend) -> None:
        for block in self.layers:
            block.attn.backend = backend

    def attention_options(self, seq_len: int = 0) -> dict:
        """The attention request's options (sftplug.attention.AttentionRequest) this model needs
        for rows of ``seq_len`` (0: unknown): none for a Llama model."""
        c = self.config
        longest = rope_longest_rows(c)
        if longest and seq_len > longest:
            raise SftplugError(f"rows of {seq_len} tokens: this model's LongRoPE switches to its long factors beyond "
                               f"original_max_position_embeddings={longest}, which sftplug does not apply; "
                               f"use --seq-len {longest} or less")
        windows = [w for w in c.layer_windows if w and (seq_len == 0 or w < seq_len)]
        options = {"window": max(windows)} if windows else {}
        if c.attn_softcap:
            options["softcap"] = c.attn_softcap
        if c.attn_scale:
            options["scale"] = c.attn_scale
        return options

    def set_fused_ops(self, ops: OpSet) -> None:
        """Compute RMSNorm, the gated MLP and RoPE with these forms (the loss takes ops.cross_entropy)."""
        for norm in (m for m in self.modules() if isinstance(m, RMSNorm)):
            norm.op = ops.rmsnorm
        for block in self.layers:
            block.attn.rope = ops.rope
            block.mlp.glu = ops.glu

    def rope(self, positions, dtype, inv_freq=None):
        # positions: [B, T] -> cos, sin: [B, T, 1, R/2]
        freqs = positions[..., None].float() * (self.inv_freq if inv_freq is None else inv_freq)  # [B, T, R/2]
        freqs = freqs[:, :, None, :]
        factor = rope_attention_factor(self.config)
        if factor != 1.0:
            return (freqs.cos() * factor).to(dtype), (freqs.sin() * factor).to(dtype)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def hidden_states(self, input_ids, positions=None, doc_ids=None, caches=None):
        """Final-norm hidden states [B, T, C] for input_ids [B, T]; caches: one generate.KVCache per layer."""
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        x = self.embed_tokens(input_ids)  # [B, T, C]
        if self.config.embed_scale != 1.0:  # the scale in the embeddings' dtype, as HF rounds it
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype, device=x.device)
        if doc_ids is not None and not getattr(self.layers[0].attn.backend, "host_doc_ids", False):
            doc_ids = doc_ids.to(x.device, non_blocking=True)  # once for every layer
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ropes = {False: self.rope(positions, dtype)}  # keyed by "a sliding-window layer"
        ropes[True] = self.rope(positions, dtype, self.inv_freq_local) if self.config.rope_local_theta else ropes[False]
        offload = self.offload_pass(x.device, [*ropes[False], *ropes[True], doc_ids]) if caches is None else None
        for i, block in enumerate(self.layers):
            cos, sin = ropes[bool(block.attn.window)]
            if caches is not None:
                x = block(x, cos, sin, cache=caches[i])
            else:
                with offload.saving(i) if offload is not None else contextlib.nullcontext():
                    x = self.run_block(block, x, cos, sin, doc_ids)
        return self.norm(x)

    def run_block(self, block, x, cos, sin, doc_ids):
        if self.checkpoint_blocks and self.training:
            return torch.utils.checkpoint.checkpoint(block, x, cos, sin, doc_ids, use_reentrant=False)
        return block(x, cos, sin, doc_ids)

    def offload_pass(self, device, shared):
        """This forward's activation offloading (sftplug.model.offload), or None: only training with grad."""
        if not (self.offload_activations and self.training and torch.is_grad_enabled()):
            return None
        if self.offloader is None:
            self.offloader = ActivationOffloader()
        return self.offloader.new_pass(device, len(self.layers), shared)

    def forward(self, input_ids, positions=None, doc_ids=None, hidden_only: bool = False, caches=None):
        """Logits [B, T, vocab] for input_ids [B, T]; the final hidden states with ``hidden_only``.

        Training asks for hidden states (its loss applies the LM head to target positions
        only) and generation passes its KV caches through forward, so wrappers that hook
        forward (FSDP, DDP) see every call.
        """
        hidden = self.hidden_states(input_ids, positions, doc_ids, caches)
        if hidden_only:
            return hidden
        return logits_of(self.lm_head(hidden), self.config.logit_scale, self.config.logit_softcap)


def logits_of(raw, scale: float = 1.0, softcap: float = 0.0):
    """The LM head's output divided by ``scale`` (Granite) and soft-capped (Gemma 2), as the model defines them."""
    if scale != 1.0:
        raw = raw / scale
    return softcap * torch.tanh(raw / softcap) if softcap else raw
