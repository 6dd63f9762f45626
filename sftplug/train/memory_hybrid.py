"""What autograd keeps for a Gated DeltaNet layer (sftplug.model.gated_deltanet), for sftplug.train.memory.

The mixer's own tensors (its projections' inputs, the depthwise convolution, q and k normalised,
β and the decay, the gated RMSNorm, ``out_proj``'s input), then the gated delta rule's as its
backend keeps them:

- ``triton`` (sftplug's kernel, a GPU's choice): its inputs only; backward recomputes each chunk's
  state (its scratch during one layer's backward is not counted, as no kernel's backward scratch is);
- ``pytorch`` (the chunked reference, the CPU's): in fp32 whatever the compute dtype, every chunk's
  matrices ([C, C] per token and value head: the pair decays, the UT system and its inverse, the
  intra-chunk scores), the solved values and keys, and the recurrent state [Hv, Dk, Dv] entering
  each chunk of each row. Rows are padded to whole chunks.

Rows hold one document each (packing adds the convolution's document masks: a value per token and
tap in the compute dtype). Measured against built runs by tests/train/test_memory.py.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from sftplug.linear_attention.pytorch import CHUNK
from sftplug.model.config import ModelConfig
from sftplug.train.memory_shapes import FP32, Saved, conv_channels, linear_attention_shapes

if TYPE_CHECKING:
    from sftplug.train.memory import Setting

BOOL = 1
LINEAR_ATTENTION = ("triton", "pytorch")


def linear_attention_saved(c: ModelConfig, s: Setting, adapters: dict[str, int]) -> list[Saved]:
    """One Gated DeltaNet mixer's saved tensors whose input needs a gradient, per token (its norm apart).

    ``adapters``: each targeted projection's LoRA rank (x A^T is kept). Under bf16 autocast the
    projections compute in bf16; full fine-tuning's fp32 convolution weight turns the convolution's
    output fp32 (so q, k and v are fp32 there), LoRA's bf16 base keeps it bf16.
    """
    o, a = c.linear_attention, 2 if s.dtype == "bf16" else FP32
    conv = a if s.lora else FP32  # the convolution's output: q, k, v
    hk, hv, key = o.key_heads, o.value_heads, o.key_heads * o.key_head_dim
    value, channels = hv * o.value_head_dim, conv_channels(c)
    inputs = len(linear_attention_shapes(c)) - 1  # the in_proj layers, each casting its input under autocast
    casts = inputs if not s.lora and a != FP32 else 1
    found = [Saved("in_proj inputs", casts * c.hidden_size, a)]
    found += [Saved(f"{name} x A^T", rank, a) for name, rank in adapters.items() if name.startswith("in_proj")]
    if not s.lora:  # the convolution weight's gradient reads its zero-padded input
        rows, length, _ = rows_of(s)
        found.append(Saved("convolution's padded input", rows * (length + o.conv_kernel - 1) * channels, a, False))
    found.append(Saved("convolution output (SiLU's input)", channels, conv))
    if conv == FP32:  # q, k: views of the SiLU output, all of which the L2 norms keep
        found.append(Saved("q, k, v after the convolution", channels, FP32))
    else:
        found.append(Saved("q, k in fp32", 2 * key, FP32))
    found += [Saved("q, k 1/norm", 2 * hk, FP32), Saved("beta = sigmoid(b)", hv, a),
              Saved("softplus input (a + dt_bias)", hv, FP32), Saved("-exp(A_log)", hv, FP32, False)]
    if not s.lora:  # A_log's gradient
        found += [Saved("exp(A_log)", hv, FP32, False), Saved("softplus output", hv, FP32)]
    found += rule_saved(c, s, conv) + gated_norm_saved(c, s, conv)
    found.append(Saved("out_proj input", value, a))
    if "out_proj" in adapters:
        found.append(Saved("out_proj x A^T", adapters["out_proj"], a))
    return found


def rows_of(s: Setting) -> tuple[int, int, int]:
    """(rows, tokens per row, chunks per row) of one micro-batch."""
    length = s.seq_len or s.tokens
    return s.tokens // length, length, math.ceil(length / CHUNK)


def rule_saved(c: ModelConfig, s: Setting, conv: int) -> list[Saved]:
    """The gated delta rule's saved tensors, its output in fp32 (the gated norm's input) included."""
    o = c.linear_attention
    hk, hv, dk, dv = o.key_heads, o.value_heads, o.key_head_dim, o.value_head_dim
    if s.linear_attention == "triton":  # q and k in v's dtype; v made contiguous; g and beta in fp32
        found = [Saved("q, k for the kernel", 2 * hk * dk, conv), Saved("v (contiguous)", hv * dv, conv),
                 Saved("g", hv, FP32)]
        if s.dtype == "bf16":
            found.append(Saved("beta in fp32", hv, FP32))
        return found + [Saved("output in fp32", hv * dv, FP32)]
    return chunked_saved(c, s, conv)


def chunked_saved(c: ModelConfig, s: Setting, conv: int) -> list[Saved]:
    """sftplug.linear_attention.pytorch's saved tensors, in fp32 whatever the compute dtype, over rows padded
    to whole chunks of C tokens: per padded token and value head (q and k per q/k head, their products
    shared by the value heads), and per chunk the state entering it."""
    o = c.linear_attention
    hk, hv, dk, dv = o.key_heads, o.value_heads, o.key_head_dim, o.value_head_dim
    rows, _, chunks = rows_of(s)
    padded = rows * chunks * CHUNK  # tokens, the padding included

    def per_token(what: str, elements: int, size: int = FP32) -> Saved:
        return Saved(what, padded * elements, size, per_token=False)

    def per_chunk(what: str, elements: int) -> Saved:
        return Saved(what, rows * chunks * elements, FP32, per_token=False)

    found = [per_token("pairs of one document (mask)", CHUNK, BOOL), per_token("decay between pairs", hv * CHUNK),
             per_token("q (scaled) and k, per q/k head", 2 * hk * dk),
             per_token("k k^T and q k^T, per q/k head", 2 * hk * CHUNK),
             per_token("k k^T beta, the UT system's inverse, the intra-chunk scores", 3 * hv * CHUNK),
             per_token("v, the solved values and decayed keys", hv * (2 * dv + dk)),
             per_token("beta and five decay factors", 6 * hv), per_token("reads, keeps", 2),
             per_token("the chunk scan's W, K and u, and q decayed", hv * (3 * dk + dv)),
             per_chunk("the state entering each chunk", hv * dk * dv),
             per_chunk("each chunk's decay, and whether it carries the state", hv + 1)]
    if conv == FP32:  # the output is a view of the chunks' output, padding included
        return found + [per_token("output (padded)", hv * dv)]
    return found + [Saved("output in fp32", hv * dv, FP32)]


def gated_norm_saved(c: ModelConfig, s: Setting, conv: int) -> list[Saved]:
    """The gated RMSNorm (its input in fp32 is the rule's output's entry): 1/rms per value head, the scaled
    normalized input in the rule's output dtype (``conv``; full also the normalized input, for the scale's
    gradient), z in fp32 and SiLU(z)."""
    hv, value = c.linear_attention.value_heads, c.linear_attention.value_heads * c.linear_attention.value_head_dim
    found = [Saved("gated norm 1/rms", hv, FP32)]
    if not s.lora:
        found.append(Saved("gated norm normalized", value, conv))
    return found + [Saved("gated norm w x", value, conv), Saved("z in fp32", value, FP32),
                    Saved("SiLU(z)", value, FP32)]
