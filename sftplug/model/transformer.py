"""The decoder, assembled: embeddings, blocks of a token mixer and a feed-forward, the final norm
and the LM head.

Each layer's mixer and feed-forward are chosen by kind from ``ModelConfig.layer_types``
(:data:`MIXERS`, :data:`FEED_FORWARDS`); their modules live beside this one (attention.py,
feed_forward.py), with the config (config.py), RMSNorm (norm.py) and RoPE's frequencies (rope.py).
The names they held here are still importable from this module.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from sftplug.errors import SftplugError
from sftplug.fused.op import OpSet
from sftplug.model.attention import Attention, attend, cached_attention, position_query_scale
from sftplug.model.config import FULL, PRESETS, ModelConfig
from sftplug.model.experts import MoE
from sftplug.model.feed_forward import MLP
from sftplug.model.gated_deltanet import GatedDeltaNet
from sftplug.model.gemma4 import Gemma4Block, block_inputs, is_gemma4
from sftplug.model.norm import RMSNorm, rms_norm_of
from sftplug.model.offload import ActivationOffloader
from sftplug.model.per_layer_inputs import PerLayerInputs
from sftplug.model.rope import rope_attention_factor, rope_inv_freq, rope_kind, rope_longest_rows

__all__ = ["MIXERS", "FEED_FORWARDS", "Block", "Transformer", "logits_of", "ModelConfig", "PRESETS", "RMSNorm",
           "rms_norm_of", "rope_inv_freq", "rope_attention_factor", "rope_longest_rows", "Attention", "attend",
           "cached_attention", "MLP"]

# LayerType's kinds -> their modules: a mixer is built from (config, layer), a feed-forward from (config).
MIXERS = {"attention": Attention, "linear_attention": GatedDeltaNet}
FEED_FORWARDS = {"mlp": MLP, "experts": MoE}


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); Gemma also norms each output, OLMo 2 only the outputs.

    ``attn`` is the layer's token mixer and ``mlp`` its feed-forward, of the kinds its LayerType
    names (the attribute names are the state dict's and LoRA's, whatever the kind).
    """

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        kind = config.layer_type(layer)
        before, after = config.norm.placement != "post", config.norm.placement != "pre"
        self.attn_norm = rms_norm_of(config) if before else None
        self.attn = _of_kind(MIXERS, "mixer", kind.mixer)(config, layer)
        self.attn_post_norm = rms_norm_of(config) if after else None
        self.mlp_norm = rms_norm_of(config) if before else None
        self.mlp = _of_kind(FEED_FORWARDS, "feed-forward", kind.feed_forward)(config)
        self.mlp_post_norm = rms_norm_of(config) if after else None
        self.residual_scale = config.residual_scale

    def forward(self, x, cos, sin, doc_ids=None, cache=None, query_scale=None):
        # query_scale: the queries' scale by position (Ministral 3), for an attention mixer; given only where set
        scaled_queries = {} if query_scale is None else {"query_scale": query_scale}
        mixed = self.attn(_normed(self.attn_norm, x), cos, sin, doc_ids, cache, **scaled_queries)
        x = x + self.scaled(_normed(self.attn_post_norm, mixed))
        return x + self.scaled(_normed(self.mlp_post_norm, self.mlp(_normed(self.mlp_norm, x))))

    def scaled(self, h):
        return h if self.residual_scale == 1.0 else h * self.residual_scale

    def new_cache(self):
        """Generation's state of this layer between calls (a KV cache for attention), made by its mixer."""
        return self.attn.new_cache()


def _normed(norm, x):
    return x if norm is None else norm(x)


def _of_kind(kinds: dict, what: str, kind: str):
    if kind not in kinds:
        raise ValueError(f"layer_types: {what} {kind!r} is not one of {', '.join(map(repr, kinds))}")
    return kinds[kind]


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        block = Gemma4Block if is_gemma4(config) else Block
        self.layers = nn.ModuleList(block(config, i) for i in range(config.n_layers))
        self.per_layer_inputs = PerLayerInputs(config) if config.gemma4.per_layer_input_size else None  # Gemma 4
        self.norm = rms_norm_of(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        for kind in config.rotary.kinds:  # inv_freq (full attention), inv_freq_sliding_attention (their own)
            self.register_buffer(_inv_freq_name(kind), rope_inv_freq(config, kind), persistent=False)
        self.checkpoint_blocks = False  # activation checkpointing (--grad-ckpt)
        self.offload_activations = False  # saved activations kept in CPU memory (--offload-activations)
        self.offloader = None  # its sftplug.model.offload.ActivationOffloader, made at the first such forward

    def init_weights(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        norms = {f"{name}.weight": m for name, m in self.named_modules() if hasattr(m, "eps") and hasattr(m, "weight")}
        for name, p in self.named_parameters():
            if name in norms:  # (1 + w) RMSNorms start at 0; the rest, a gated one too, at 1
                nn.init.zeros_(p) if getattr(norms[name], "gemma", False) else nn.init.ones_(p)
            elif name.endswith("bias") and not name.endswith("dt_bias"):  # nn.Linear's, the experts'
                nn.init.zeros_(p)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=generator) * self.config.init_std)
        self.reset_rope(self.inv_freq.device)

    def reset_rope(self, device) -> None:
        """Compute the RoPE frequencies (non-persistent fp32 buffers, never loaded) on ``device``."""
        for kind in self.config.rotary.kinds:
            setattr(self, _inv_freq_name(kind), rope_inv_freq(self.config, kind).to(device))

    def set_attention(self, backend) -> None:
        """The softmax-attention backend of every layer whose mixer is attention (linear attention has its own)."""
        for i, block in enumerate(self.layers):
            if self.config.layer_type(i).mixer != "linear_attention":
                block.attn.backend = backend

    def attention_backend(self):
        """The softmax-attention backend (None before one is set, or where every layer is linear attention)."""
        for i, block in enumerate(self.layers):
            if self.config.layer_type(i).mixer != "linear_attention":
                return block.attn.backend
        return None

    def attention_options(self, seq_len: int = 0) -> dict:
        """The attention request's options (sftplug.attention.AttentionRequest) this model needs
        for rows of ``seq_len`` (0: unknown): none for a Llama model."""
        longest = rope_longest_rows(self.config)
        if longest and seq_len > longest:
            raise SftplugError(f"rows of {seq_len} tokens: this model's LongRoPE switches to its long factors beyond "
                               f"original_max_position_embeddings={longest}, which sftplug does not apply; "
                               f"use --seq-len {longest} or less")
        attention = self.config.attention
        windows = [w for w in attention.windows if w and (seq_len == 0 or w < seq_len)]
        options = {"window": max(windows)} if windows else {}
        if attention.softcap:
            options["softcap"] = attention.softcap
        if attention.scale:
            options["scale"] = attention.scale
        if attention.sinks:
            options["sinks"] = True
        return options

    def set_fused_ops(self, ops: OpSet) -> None:
        """Compute RMSNorm, the gated MLP and RoPE with these forms (the loss takes ops.cross_entropy)."""
        for norm in (m for m in self.modules() if isinstance(m, RMSNorm)):
            norm.op = ops.rmsnorm
        for block in self.layers:  # each mixer and feed-forward takes the ops it computes with
            block.attn.set_fused_ops(ops)
            block.mlp.set_fused_ops(ops)

    def rope(self, positions, dtype, kind: str = FULL):
        """cos, sin [B, T, 1, R/2] at positions [B, T] in the layers of this kind (sftplug.model.rope.rope_kind)."""
        freqs = positions[..., None].float() * getattr(self, _inv_freq_name(kind))  # [B, T, R/2]
        freqs = freqs[:, :, None, :]
        factor = rope_attention_factor(self.config, kind)
        if factor != 1.0:
            return (freqs.cos() * factor).to(dtype), (freqs.sin() * factor).to(dtype)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def query_scales(self, positions) -> dict:
        """{"query_scale": [B, 1, T, 1]} at positions [B, T] where the queries are scaled by position
        (Llama 4's, Ministral 3); {} elsewhere."""
        attention = self.config.attention
        if not attention.query_scale_beta:
            return {}
        return {"query_scale": position_query_scale(positions, attention.query_scale_beta,
                                                    attention.query_scale_period)}

    def hidden_states(self, input_ids, positions=None, doc_ids=None, caches=None):
        """Final-norm hidden states [B, T, C] for input_ids [B, T]; caches: each block's new_cache(), per layer."""
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        x = self.embed_tokens(input_ids)  # [B, T, C]
        if self.config.embed_scale != 1.0:  # the scale in the embeddings' dtype, as HF rounds it
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype, device=x.device)
        if doc_ids is not None and not getattr(self.attention_backend(), "host_doc_ids", False):
            doc_ids = doc_ids.to(x.device, non_blocking=True)  # once for every layer
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ropes = {kind: self.rope(positions, dtype, kind) for kind in self.config.rotary.kinds}  # kind -> cos, sin
        scales = self.query_scales(positions)
        shared = [*sum(ropes.values(), ()), *scales.values(), doc_ids]  # every layer's inputs
        offload = self.offload_pass(x.device, shared) if caches is None else None
        extras = self.block_inputs(input_ids, x)
        for i, block in enumerate(self.layers):
            cos, sin = ropes.get(rope_kind(self.config, i), ropes[FULL])
            inputs = {**extras[i], **scales}
            if caches is not None:
                x = block(x, cos, sin, cache=caches[i], **inputs)
            else:
                with offload.saving(i) if offload is not None else contextlib.nullcontext():
                    x = self.run_block(block, x, cos, sin, doc_ids, inputs)
        return self.norm(x)

    def block_inputs(self, input_ids, embeddings) -> list[dict]:
        """Each block's keyword inputs beyond x and RoPE: none, but Gemma 4's (sftplug.model.gemma4)."""
        return block_inputs(self, input_ids, embeddings) if is_gemma4(self.config) else [{}] * len(self.layers)

    def run_block(self, block, x, cos, sin, doc_ids, extras=None):
        extras = extras or {}
        if self.checkpoint_blocks and self.training:
            return torch.utils.checkpoint.checkpoint(block, x, cos, sin, doc_ids, use_reentrant=False, **extras)
        return block(x, cos, sin, doc_ids, **extras)

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
        only) and generation passes its caches through forward, so wrappers that hook
        forward (FSDP, DDP) see every call.
        """
        hidden = self.hidden_states(input_ids, positions, doc_ids, caches)
        if hidden_only:
            return hidden
        return logits_of(self.lm_head(hidden), self.config.logit_scale, self.config.logit_softcap)


def _inv_freq_name(kind: str) -> str:
    return "inv_freq" if kind == FULL else f"inv_freq_{kind}"


def logits_of(raw, scale: float = 1.0, softcap: float = 0.0):
    """The LM head's output divided by ``scale`` (Granite) and soft-capped (Gemma 2), as the model defines them."""
    if scale != 1.0:
        raw = raw / scale
    return softcap * torch.tanh(raw / softcap) if softcap else raw
