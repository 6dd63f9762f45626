"""The model's tensors counted from its config, as sftplug builds them (for sftplug.train.memory).

Each block is a token mixer and a feed-forward of its layer's kind. The mixer is softmax attention
(its q projection twice as wide where each head carries an output gate) or Gated DeltaNet (its
input projections, the depthwise convolution, ``A_log`` and ``dt_bias``, the gated norm and
``out_proj``); the feed-forward a dense gated MLP or a mixture of experts (router, experts stacked
per projection, biases where the family has them). The root is the embeddings, the final norm and
the LM head. LoRA adapters: A [n r, in] and B [out, n r] per targeted linear layer (n its targeted
projections, stacked as sftplug.model.lora stores them), and per targeted expert projection
A [E, r, in] and B [E, out, r] (sftplug.model.experts_lora). tests/train/test_memory.py checks the
names and sizes against built models' parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sftplug.errors import SftplugError
from sftplug.model.config import ModelConfig
from sftplug.model.lora_targets import hf_targets, lora_layout
from sftplug.model.quantize import BLOCKSIZE as QUANT_BLOCK

FP32 = 4
QUANT_SCALE_BLOCK = 256  # double quantization's blocks of scales (of QUANT_BLOCK-weight blocks)
QUANT_CODE, SCALE_CODE = 16, 256  # the 4-bit code's values; the 8-bit code of the scales


@dataclass
class Saved:
    """One tensor autograd keeps for backward: elements per token (or in all, ``per_token=False``), bytes each."""

    what: str
    elements: int
    bytes: int
    per_token: bool = True

    def total(self, tokens: int) -> int:
        return self.elements * self.bytes * (tokens if self.per_token else 1)


def check_modelled(c: ModelConfig) -> None:
    """Refuse, in one line, the models whose parts the memory model does not count."""
    g = c.gemma4
    if g.per_layer_input_size or g.full_head_dim or g.full_kv_heads or g.kv_shared_layers:
        raise SftplugError(f"memory model: {c.architecture}'s per-layer inputs, per-layer head shapes and shared "
                           "keys/values (Gemma 4) are not modelled yet")
    o = c.experts
    if not c.has_experts:
        return
    if o.shared_size or o.shared_gate:
        raise SftplugError(f"memory model: {c.architecture}'s shared expert is not modelled yet (Qwen3-MoE and "
                           "gpt-oss are)")
    if o.router == "sigmoid_groups":
        raise SftplugError(f"memory model: {c.architecture}'s group-limited sigmoid router is not modelled yet "
                           "(Qwen3-MoE's and gpt-oss's routers are)")


def is_moe(c: ModelConfig, layer: int) -> bool:
    return c.layer_type(layer).feed_forward == "experts"


def is_linear_attention(c: ModelConfig, layer: int) -> bool:
    return c.layer_type(layer).mixer == "linear_attention"


def is_hybrid(c: ModelConfig) -> bool:
    return any(is_linear_attention(c, i) for i in range(c.n_layers))


def moe_layers(c: ModelConfig) -> int:
    return sum(is_moe(c, i) for i in range(c.n_layers))


def linear_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each dense attention block's linear layers, sftplug's fused layers (q twice as
    wide with output gates)."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    gated_q = q * (2 if c.attention.output_gate else 1)
    return {"qkv": (c.hidden_size, gated_q + 2 * kv), "o": (q, c.hidden_size),
            "gate_up": (c.hidden_size, 2 * c.intermediate_size), "down": (c.intermediate_size, c.hidden_size)}


def linear_attention_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of a Gated DeltaNet layer's projections, as the family stores them."""
    o, hidden = c.linear_attention, c.hidden_size
    key, value = o.key_heads * o.key_head_dim, o.value_heads * o.value_head_dim
    if o.projections == "grouped":  # Qwen3-Next
        shapes = {"in_proj_qkvz": (hidden, 2 * key + 2 * value), "in_proj_ba": (hidden, 2 * o.value_heads)}
    else:
        shapes = {"in_proj_qkv": (hidden, 2 * key + value), "in_proj_z": (hidden, value),
                  "in_proj_b": (hidden, o.value_heads), "in_proj_a": (hidden, o.value_heads)}
    return {**shapes, "out_proj": (value, hidden)}


def block_linear_shapes(c: ModelConfig, layer: int) -> dict[str, tuple[int, int]]:
    """(in, out) features of block ``layer``'s linear layers: its mixer's, and its MLP's unless it has experts."""
    dense = linear_shapes(c)
    mixer = linear_attention_shapes(c) if is_linear_attention(c, layer) else {k: dense[k] for k in ("qkv", "o")}
    return mixer if is_moe(c, layer) else {**mixer, "gate_up": dense["gate_up"], "down": dense["down"]}


def expert_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each expert's projections."""
    inter = c.experts.intermediate_size
    return {"gate_up_proj": (c.hidden_size, 2 * inter), "down_proj": (inter, c.hidden_size)}


def norm_sizes(c: ModelConfig, layer: int = 0) -> list[int]:
    """Block ``layer``'s RMSNorm scales: the block's, and its attention's q/k norms or Gated DeltaNet's gated norm."""
    sizes = [c.hidden_size] * {"pre": 2, "sandwich": 4, "post": 2}[c.norm.placement]
    if is_linear_attention(c, layer):
        sizes.append(c.linear_attention.value_head_dim)
    elif c.attention.qk_norm == "head":
        sizes += [c.head_dim] * 2
    elif c.attention.qk_norm == "projection":
        sizes += [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim]
    return sizes


def block_tensors(c: ModelConfig, layer: int) -> dict[str, int]:
    """Elements of each parameter of block ``layer``, by its name in the model (norms apart: norm_sizes)."""
    shapes, a = block_linear_shapes(c, layer), c.attention
    mixer = ("qkv", "o") if not is_linear_attention(c, layer) else tuple(linear_attention_shapes(c))
    tensors = {f"attn.{name}.weight": i * o for name, (i, o) in shapes.items() if name in mixer}
    if is_linear_attention(c, layer):
        o = c.linear_attention
        tensors.update({"attn.conv1d.weight": conv_channels(c) * o.conv_kernel, "attn.dt_bias": o.value_heads,
                        "attn.A_log": o.value_heads})
    elif a.qkv_bias:
        tensors["attn.qkv.bias"] = shapes["qkv"][1]
    if a.o_bias and not is_linear_attention(c, layer):
        tensors["attn.o.bias"] = c.hidden_size
    if a.sinks and not is_linear_attention(c, layer):
        tensors["attn.sinks"] = c.n_heads
    if not is_moe(c, layer):
        tensors.update({f"mlp.{name}.weight": i * o for name, (i, o) in shapes.items() if name in ("gate_up", "down")})
        return tensors
    experts = c.experts
    tensors["mlp.router.weight"] = experts.count * c.hidden_size
    if experts.router_bias:
        tensors["mlp.router.bias"] = experts.count
    for name, (i, o) in expert_shapes(c).items():
        tensors[f"mlp.experts.{name}"] = experts.count * i * o
        if experts.bias:
            tensors[f"mlp.experts.{name}_bias"] = experts.count * o
    return tensors


def conv_channels(c: ModelConfig) -> int:
    """The Gated DeltaNet convolution's channels: q, k and v."""
    o = c.linear_attention
    return 2 * o.key_heads * o.key_head_dim + o.value_heads * o.value_head_dim


def block_matrices(c: ModelConfig, layer: int) -> int:
    """Elements of block ``layer``'s weight matrices (the linear layers', the router's, the experts'):
    what full fine-tuning under bf16 autocast copies to bf16 and keeps for backward (the convolution is
    elementwise products, A_log a scale: neither is cast)."""
    skipped = ("bias", "sinks", "A_log", "conv1d.weight")
    return sum(n for name, n in block_tensors(c, layer).items() if not name.endswith(skipped))


def block_params(c: ModelConfig, layer: int) -> int:
    return sum(block_tensors(c, layer).values()) + sum(norm_sizes(c, layer))


def root_params(c: ModelConfig) -> int:
    """Embeddings, the final norm and the LM head (once when tied)."""
    return c.vocab_size * c.hidden_size * (1 if c.tie_embeddings else 2) + c.hidden_size


def model_params(c: ModelConfig) -> int:
    return sum(block_params(c, i) for i in range(c.n_layers)) + root_params(c)


def buffer_bytes(c: ModelConfig) -> int:
    """The RoPE frequencies (fp32), once per kind of layer with a RoPE of its own."""
    return sum(c.rotary.of(kind).dims // 2 for kind in c.rotary.kinds) * FP32


def trainable_tensors(c: ModelConfig, lora: bool, r: int, targets) -> list[int]:
    """Elements of every trainable tensor: the adapters, or (full) every parameter."""
    if lora:
        return lora_tensors(c, r, targets)
    blocks = [n for i in range(c.n_layers) for n in [*block_tensors(c, i).values(), *norm_sizes(c, i)]]
    return blocks + [c.vocab_size * c.hidden_size] * (1 if c.tie_embeddings else 2) + [c.hidden_size]


# -- LoRA ----------------------------------------------------------------------------------


def lora_shapes(c: ModelConfig, targets, layer: int | None = 0) -> dict[str, tuple[int, int, int]]:
    """Per LoRA linear layer of block ``layer`` (None: the LM head): (in, out, n), n the projections it
    targets; A is [n r, in], B [out, n r], stored whole."""
    targets = hf_targets(targets)
    shapes = {"lm_head": (c.hidden_size, c.vocab_size)} if layer is None else block_linear_shapes(c, layer)
    layers = {}
    for name, parts in lora_layout(c).items():
        n = sum(part in targets for part, _, _ in parts)
        if n and name in shapes:
            layers[name] = (*shapes[name], n)
    return layers


def expert_lora_shapes(c: ModelConfig, targets, layer: int) -> dict[str, tuple[int, int]]:
    """Block ``layer``'s targeted expert projections: (in, out); A is [E, r, in], B [E, out, r]."""
    if not is_moe(c, layer):
        return {}
    targets = hf_targets(targets)
    return {name: shape for name, shape in expert_shapes(c).items() if f"experts.{name}" in targets}


def block_lora_tensors(c: ModelConfig, r: int, targets, layer: int | None) -> list[int]:
    """Elements of block ``layer``'s adapter tensors (None: the LM head's)."""
    sizes = []
    for i, o, n in lora_shapes(c, targets, layer).values():
        sizes += [n * r * i, o * n * r]
    if layer is not None:
        for i, o in expert_lora_shapes(c, targets, layer).values():
            sizes += [c.experts.count * r * i, c.experts.count * o * r]
    return sizes


def lora_tensors(c: ModelConfig, r: int, targets) -> list[int]:
    """Elements of every adapter tensor."""
    return [n for layer in [*range(c.n_layers), None] for n in block_lora_tensors(c, r, targets, layer)]


# -- 4-bit weights -------------------------------------------------------------------------


def quantized_bytes(elements: int, double_quant: bool) -> int:
    """One weight as bitsandbytes' 4-bit: two values a byte, its 16 code values (fp32), and a scale per
    block of 64 (fp32, or with double quantization one byte each, with an fp32 scale per 256 blocks, one
    fp32 offset and the scales' own 256-value fp32 code)."""
    blocks = math.ceil(elements / QUANT_BLOCK)
    packed = math.ceil(elements / 2) + QUANT_CODE * FP32
    if not double_quant:
        return packed + blocks * FP32
    return packed + blocks + (math.ceil(blocks / QUANT_SCALE_BLOCK) + 1 + SCALE_CODE) * FP32


def packed_bytes(c: ModelConfig) -> int:
    """The 4-bit data alone of every block linear (what FSDP shards of a 4-bit base)."""
    return c.n_layers * sum(math.ceil(i * o / 2) for i, o in linear_shapes(c).values())


def quantized_linear_bytes(c: ModelConfig, double_quant: bool) -> int:
    """Every block linear's 4-bit weight (biases stay dense)."""
    return c.n_layers * sum(quantized_bytes(i * o, double_quant) for i, o in linear_shapes(c).values())
