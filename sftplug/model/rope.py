"""RoPE's frequencies: the base, Llama 3.1's, linear and LongRoPE scaling, and the sliding-window
layers' own base (Gemma 3). The rotation itself is a fused op (sftplug.fused)."""

from __future__ import annotations

import math

import torch

from sftplug.model.config import ModelConfig


def rope_inv_freq(config: ModelConfig, local: bool = False) -> torch.Tensor:
    """Each rotated pair's frequency; ``local``: the sliding-window layers' (Gemma 3: their own base, unscaled)."""
    rotary = config.rotary
    d = rotary.dims
    theta = rotary.local_theta if local else rotary.theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = {} if local else rotary.scaling or {}
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
    scaling = config.rotary.scaling or {}
    return float(scaling.get("attention_factor", 1.0)) if scaling.get("rope_type") == "longrope" else 1.0


def rope_longest_rows(config: ModelConfig) -> int | None:
    """The longest rows RoPE is computed for exactly (LongRoPE switches factors beyond), or None."""
    scaling = config.rotary.scaling or {}
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
