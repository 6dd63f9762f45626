"""RoPE's frequencies: the base, Llama 3.1's, linear, LongRoPE and YaRN scaling, each kind of
layer's own (the sliding-window layers' of Gemma 3 and OLMo 3: RotaryConfig.sliding). The rotation
itself is a fused op (sftplug.fused)."""

from __future__ import annotations

import math

import torch

from sftplug.model.config import FULL, SLIDING, ModelConfig, Rope


def rope_kind(config: ModelConfig, layer: int) -> str:
    """The kind of RoPE this layer takes: SLIDING for a sliding-window layer, else FULL."""
    return SLIDING if config.attention.window(layer) else FULL


def rope_inv_freq(config: ModelConfig, kind: str = FULL) -> torch.Tensor:
    """Each rotated pair's frequency in the layers of this kind."""
    rope = config.rotary.of(kind)
    d, theta = rope.dims, rope.theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling, scaled_by = rope.scaling or {}, _scaling_kind(rope)
    if scaled_by == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    elif scaled_by == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaled_by == "longrope":  # rows up to original_max_position_embeddings: the short factors (Phi-3/4)
        inv_freq = inv_freq / torch.tensor(scaling["short_factor"], dtype=torch.float64)
    elif scaled_by == "yarn":
        return _yarn_inv_freq(theta, d, scaling)
    elif scaled_by == "proportional":  # Gemma 4: the first pairs of the whole head rotated, the rest at frequency 0
        angles = int(scaling["partial_rotary_factor"] * d // 2)
        inv_freq = torch.cat([inv_freq[:angles], inv_freq.new_zeros(d // 2 - angles)]) / scaling["factor"]
    elif scaled_by not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {scaled_by!r} (supported: llama3, linear, longrope, yarn)")
    return inv_freq.float()


def rope_attention_factor(config: ModelConfig, kind: str = FULL) -> float:
    """LongRoPE and YaRN scale cos and sin by this in the layers of this kind (1 for every other scaling)."""
    rope = config.rotary.of(kind)
    scaling, scaled_by = rope.scaling or {}, _scaling_kind(rope)
    if scaled_by == "longrope":
        return float(scaling.get("attention_factor", 1.0))
    if scaled_by == "yarn":
        return _yarn_attention_factor(scaling)
    return 1.0


def rope_longest_rows(config: ModelConfig) -> int | None:
    """The longest rows RoPE is computed for exactly (LongRoPE switches factors beyond), or None."""
    lengths = [rope.scaling["original_max_position_embeddings"] for rope in map(config.rotary.of, config.rotary.kinds)
               if _scaling_kind(rope) == "longrope"]
    return min(lengths) if lengths else None


def _scaling_kind(rope: Rope) -> str | None:
    scaling = rope.scaling or {}
    return scaling.get("rope_type", scaling.get("type"))


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
