"""RoPE's frequencies: the base, Llama 3.1's, linear, LongRoPE and YaRN scaling, and the
sliding-window layers' own base (Gemma 3). The rotation itself is a fused op (sftplug.fused)."""

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
    elif kind == "yarn":
        return _yarn_inv_freq(theta, d, scaling)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: llama3, linear, longrope, yarn)")
    return inv_freq.float()


def rope_attention_factor(config: ModelConfig) -> float:
    """LongRoPE and YaRN scale cos and sin by this (1 for every other kind)."""
    scaling = config.rotary.scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "longrope":
        return float(scaling.get("attention_factor", 1.0))
    if kind == "yarn":
        return _yarn_attention_factor(scaling)
    return 1.0


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


def _yarn_inv_freq(theta: float, d: int, s: dict) -> torch.Tensor:
    """YaRN (gpt-oss, DeepSeek): the fast pairs keep their frequency, the slow ones are divided by
    the factor, a linear ramp between. Computed in fp32 in transformers' order, so bitwise equal."""
    factor, original = s["factor"], s["original_max_position_embeddings"]
    fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def pair_of(rotations: float) -> float:  # the pair turning this many times over the original length
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_of(fast), pair_of(slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # a step, not a division by zero
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    kept = 1 - ramp  # 1: the pair's own frequency (extrapolated), 0: divided by the factor (interpolated)
    pos_freqs = theta ** (torch.arange(0, d, 2).float() / d)
    return 1.0 / (factor * pos_freqs) * (1 - kept) + 1.0 / pos_freqs * kept


def _yarn_attention_factor(s: dict) -> float:
    """YaRN's cos/sin scale: given, or 0.1 ln(factor) + 1, each ln(factor) times mscale over mscale_all_dim
    when both are given (DeepSeek)."""
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])

    def mscale(weight: float = 1.0) -> float:
        return 1.0 if s["factor"] <= 1 else 0.1 * weight * math.log(s["factor"]) + 1.0

    if s.get("mscale") and s.get("mscale_all_dim"):
        return float(mscale(s["mscale"]) / mscale(s["mscale_all_dim"]))
    return mscale()
