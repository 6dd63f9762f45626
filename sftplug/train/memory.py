"""A training step's peak device memory, modelled from the model's shapes (``python -m sftplug.train.memory``).

Two parts, each counted as sftplug stores it:

- persistent: the frozen base (in its dtype, or 4-bit packed with its scales), the trainable
  weights, their gradients and the optimizer's state; FSDP over N processes keeps 1/N of each
  (a 4-bit base as its packed bytes, its scales whole on every process) and gathers the root's
  and one block's weights at a time;
- activations: what autograd saves in one micro-batch's forward, per token and block, for the
  PyTorch forms of the ops (``--fused none``, the CPU's choice) and the attention kernel;
  with ``--grad-ckpt`` the blocks' inputs plus one block's recompute; with
  ``--offload-activations`` only three blocks' worth stays on the device (sftplug.model.offload);
  and the loss's largest transient, one chunk of logits (sftplug.train.loss).

The peak is their sum: an upper bound that counts every gradient beside every activation
(for LoRA the gradients are small). tests/train/test_memory.py checks each part against a
built run: parameters, gradients and optimizer state byte for byte, and the unique storages
autograd saves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from sftplug.config import DEFAULT_LORA_TARGETS
from sftplug.errors import SftplugError
from sftplug.model.config import ModelConfig
from sftplug.model.lora_targets import lora_layout
from sftplug.model.quantize import BLOCKSIZE as QUANT_BLOCK
from sftplug.train.loss import CHUNK_ROWS as LOSS_CHUNK

FP32, BF16, INT64 = 4, 2, 8
BYTES = {"fp32": FP32, "bf16": BF16}
MODES = ("full", "lora", "nf4", "fp4")  # nf4/fp4: QLoRA, LoRA on a 4-bit base
OPTIMIZERS = ("adamw", "adamw8bit")
ATTENTION = ("flash", "chunked")  # SDPA's flash kernel (GPU and CPU), sftplug's chunked CPU kernel
QUANT_SCALE_BLOCK = 256  # double quantization's blocks of scales (of QUANT_BLOCK-weight blocks)
QUANT_CODE, SCALE_CODE = 16, 256  # the 4-bit code's values; the 8-bit code of the scales
ADAM8_BLOCK, ADAM8_MIN_SIZE = 256, 4096  # bitsandbytes' 8-bit state: blocks, and the size below which it is fp32
OFFLOAD_BLOCKS = 3  # blocks whose saved tensors are on the device at once with --offload-activations

# The shapes of the Llama checkpoints' config.json (hidden_size, intermediate_size, ...).
LLAMA = {
    "Llama-3.2-1B": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, n_layers=16, n_heads=32,
                                n_kv_heads=8, head_dim=64, tie_embeddings=True),
    "Llama-3.1-8B": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, n_layers=32, n_heads=32,
                                n_kv_heads=8, head_dim=128),
    "Llama-3.1-70B": ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, n_layers=80,
                                 n_heads=64, n_kv_heads=8, head_dim=128),
}


@dataclass(frozen=True)
class Setting:
    """What a run trains and how: the options of ``sftplug train`` that change its memory."""

    mode: str = "lora"  # full, lora, nf4 or fp4
    dtype: str = "bf16"  # the compute precision (--dtype): bf16 or fp32
    optimizer: str = "adamw"
    tokens: int = 4096  # per micro-batch (--micro-bsz x --seq-len)
    targets: int | None = None  # target tokens per micro-batch; None: every token
    grad_ckpt: bool = False
    offload: bool = False  # --offload-activations
    world: int = 1  # FSDP over this many processes (1: none)
    attention: str = "flash"
    lora_r: int = 16
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    double_quant: bool = True

    def __post_init__(self):
        for name, allowed in (("mode", MODES), ("dtype", tuple(BYTES)), ("optimizer", OPTIMIZERS),
                              ("attention", ATTENTION)):
            if getattr(self, name) not in allowed:
                raise SftplugError(f"memory model: {name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.attention == "chunked" and self.dtype != "fp32":
            raise SftplugError("memory model: chunked attention computes in fp32 only; use dtype fp32 or flash")
        if self.world < 1 or self.tokens < 1:
            raise SftplugError("memory model: world and tokens must be at least 1")

    @property
    def lora(self) -> bool:
        return self.mode != "full"

    @property
    def quantized(self) -> bool:
        return self.mode in ("nf4", "fp4")


@dataclass
class Saved:
    """One tensor autograd keeps for backward: elements per token (or in all, ``per_token=False``), bytes each."""

    what: str
    elements: int
    bytes: int
    per_token: bool = True

    def total(self, tokens: int) -> int:
        return self.elements * self.bytes * (tokens if self.per_token else 1)


@dataclass
class Estimate:
    """Bytes of one training step on one device, by part."""

    params: int  # the model's parameters (tied embeddings once): the denominator of bytes per parameter
    base: int  # frozen weights (and buffers)
    trainable: int
    gradients: int
    optimizer: int
    in_flight: int  # FSDP: the weights gathered for the module being computed
    activations: int  # what autograd keeps at the end of the forward (or, checkpointed, during a block's backward)
    loss_chunk: int  # the loss's largest transient: one chunk of logits and their gradient
    saved: list[Saved] = field(default_factory=list, repr=False)  # one block's saved tensors, for reading

    @property
    def persistent(self) -> int:
        return self.base + self.trainable + self.gradients + self.optimizer

    @property
    def peak(self) -> int:
        return self.persistent + self.in_flight + self.activations + self.loss_chunk

    def per_param(self, part: int) -> float:
        return part / self.params


# -- the model's tensors -------------------------------------------------------------


def linear_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each block linear, sftplug's fused layers."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return {"qkv": (c.hidden_size, q + 2 * kv), "o": (q, c.hidden_size),
            "gate_up": (c.hidden_size, 2 * c.intermediate_size), "down": (c.intermediate_size, c.hidden_size)}


def block_linear_params(c: ModelConfig) -> int:
    biases = linear_shapes(c)["qkv"][1] if c.attention.qkv_bias else 0
    return sum(i * o for i, o in linear_shapes(c).values()) + biases


def norm_params(c: ModelConfig) -> int:
    """Per block: the RMSNorm scales (and q/k norms)."""
    return sum(norm_sizes(c))


def root_params(c: ModelConfig) -> int:
    """Embeddings, the final norm and the LM head (once when tied)."""
    return c.vocab_size * c.hidden_size * (1 if c.tie_embeddings else 2) + c.hidden_size


def model_params(c: ModelConfig) -> int:
    return c.n_layers * (block_linear_params(c) + norm_params(c)) + root_params(c)


def buffer_bytes(c: ModelConfig) -> int:
    """The RoPE frequencies (fp32), once per base."""
    return (c.rotary.dims // 2) * FP32 * (2 if c.rotary.local_theta else 1)


def lora_shapes(c: ModelConfig, s: Setting) -> dict[str, tuple[int, int, int]]:
    """Per LoRA layer: (in, out, n) with n the projections it targets; A is [n r, in], B [out, n r], stored whole."""
    shapes = {**linear_shapes(c), "lm_head": (c.hidden_size, c.vocab_size)}
    layers = {}
    for layer, parts in lora_layout(c).items():
        n = sum(part in s.lora_targets for part, _, _ in parts)
        if n:
            layers[layer] = (*shapes[layer], n)
    return layers


def lora_tensors(c: ModelConfig, s: Setting) -> list[int]:
    """Elements of every adapter tensor (A and B of each layer)."""
    sizes = []
    for layer, (i, o, n) in lora_shapes(c, s).items():
        sizes += [n * s.lora_r * i, o * n * s.lora_r] * (1 if layer == "lm_head" else c.n_layers)
    return sizes


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


def quantized_linear_bytes(c: ModelConfig, s: Setting) -> int:
    """Every block linear's 4-bit weight (biases stay dense)."""
    return c.n_layers * sum(quantized_bytes(i * o, s.double_quant) for i, o in linear_shapes(c).values())


def trainable_tensors(c: ModelConfig, s: Setting) -> list[int]:
    """Elements of every trainable tensor: the adapters, or (full) every weight."""
    if s.lora:
        return lora_tensors(c, s)
    per_block = [i * o for i, o in linear_shapes(c).values()] + norm_sizes(c)
    if c.attention.qkv_bias:
        per_block.append(linear_shapes(c)["qkv"][1])
    root = [c.vocab_size * c.hidden_size] * (1 if c.tie_embeddings else 2) + [c.hidden_size]
    return per_block * c.n_layers + root


def norm_sizes(c: ModelConfig) -> list[int]:
    """Per block: each RMSNorm's scale (and the q/k norms')."""
    sizes = [c.hidden_size] * {"pre": 2, "sandwich": 4, "post": 2}[c.norm.placement]
    if c.attention.qk_norm == "head":
        sizes += [c.head_dim] * 2
    elif c.attention.qk_norm == "projection":
        sizes += [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim]
    return sizes


def optimizer_bytes(sizes: list[int], optimizer: str) -> int:
    """AdamW: two fp32 moments and an fp32 step count per tensor; adamw8bit: two uint8 moments with an fp32
    scale per 256 values (fp32 moments for tensors under 4096 values), and its two 256-entry fp32 maps."""
    if optimizer == "adamw":
        return sum(2 * n * FP32 + FP32 for n in sizes)
    total = 0
    for n in sizes:
        total += 2 * n * FP32 if n < ADAM8_MIN_SIZE else 2 * (n + math.ceil(n / ADAM8_BLOCK) * FP32)
    return total + (2 * 256 * FP32 if any(n >= ADAM8_MIN_SIZE for n in sizes) else 0)


def base_bytes(c: ModelConfig, s: Setting) -> int:
    """The frozen base: LoRA keeps it in the compute dtype; QLoRA packs the block linears in 4 bits."""
    if not s.lora:
        return buffer_bytes(c)
    dtype = BYTES[s.dtype]
    linears = c.n_layers * block_linear_params(c)
    linear_bytes = linears * dtype
    if s.quantized:
        biases = c.n_layers * linear_shapes(c)["qkv"][1] if c.attention.qkv_bias else 0
        linear_bytes = quantized_linear_bytes(c, s) + biases * dtype
    return linear_bytes + (model_params(c) - linears) * dtype + buffer_bytes(c)


# -- activations -----------------------------------------------------------------------


def block_saved(c: ModelConfig, s: Setting) -> list[Saved]:
    """What autograd keeps for one block whose input needs a gradient, per token.

    The residual stream is fp32 unless a LoRA base is bf16; each RMSNorm keeps its input in
    fp32 and the reciprocal RMS (full fine-tuning also the normalized input, for its scale's
    gradient); each linear keeps its input in the compute dtype (LoRA also x A^T); SwiGLU keeps
    the gate/up output and silu(gate).
    """
    a = BYTES[s.dtype]
    inter, hidden = c.intermediate_size, c.hidden_size
    adapters = {layer: n * s.lora_r for layer, (_, _, n) in lora_shapes(c, s).items()} if s.lora else {}
    saved = []
    for norm, linear in (("attn_norm", "qkv"), ("mlp_norm", "gate_up")):
        saved += norm_saved(norm, c, s) + [Saved(f"{linear} input", hidden, a)]
        saved += lora_saved(linear, adapters, a)
    saved += attention_saved(c, s)
    saved += lora_saved("o", adapters, a)
    saved += [Saved("gate_up output", 2 * inter, a), Saved("silu(gate)", inter, a), Saved("down input", inter, a)]
    saved += lora_saved("down", adapters, a)
    return [x for x in saved if x.elements]


def norm_saved(name: str, c: ModelConfig, s: Setting) -> list[Saved]:
    saved = [Saved(f"{name} input in fp32", c.hidden_size, FP32), Saved(f"{name} 1/rms", 1, FP32)]
    if not s.lora:
        saved.append(Saved(f"{name} normalized", c.hidden_size, residual_bytes(s)))
    return saved


def lora_saved(layer: str, adapters: dict[str, int], a: int) -> list[Saved]:
    return [Saved(f"{layer} x A^T", adapters[layer], a)] if layer in adapters else []


def attention_saved(c: ModelConfig, s: Setting) -> list[Saved]:
    """The attention kernel's saved tensors and the o projection's input."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    a = BYTES[s.dtype]
    if s.attention == "flash":  # q, k, v (views of RoPE's output), the output (o's input) and the log-sum-exp
        return [Saved("q, k, v after RoPE", q + 2 * kv, a), Saved("attention output (o input)", q, a),
                Saved("log-sum-exp", c.n_heads, FP32)]
    return [Saved("scaled q", q, FP32), Saved("k, v (grouped copies)", 2 * kv, FP32),
            Saved("attention output", q, FP32), Saved("o input", q, FP32)]


def residual_bytes(s: Setting) -> int:
    return BYTES[s.dtype] if s.lora else FP32  # full fine-tuning keeps fp32 weights, so fp32 activations between ops


def outside_saved(c: ModelConfig, s: Setting, targets: int) -> list[Saved]:
    """Saved outside the blocks: RoPE's cos and sin (shared by every layer), the embedding's indices (full),
    the final norm, and the loss: target indices and the hidden states' gradient (and the LM head's, full)."""
    a, r = BYTES[s.dtype], residual_bytes(s)
    saved = [Saved("cos, sin", c.rotary.dims, a)] + norm_saved("norm", c, s)
    saved += [Saved("target indices", targets, INT64, per_token=False),
              Saved("hidden-state gradient of the targets", targets * c.hidden_size, r, per_token=False)]
    if not s.lora:
        saved += [Saved("input ids", 1, INT64), Saved("LM head gradient", c.vocab_size * c.hidden_size, FP32, False)]
        if s.dtype == "bf16":  # autocast keeps a bf16 copy of each block weight until the forward ends
            saved.append(Saved("autocast's bf16 weight copies", c.n_layers * block_linear_params(c), BF16, False))
    return saved


def first_block_unsaved(c: ModelConfig, s: Setting) -> int:
    """Bytes per token the first block does not keep under LoRA: its input (the frozen embedding's output)
    needs no gradient, so its first norm keeps nothing."""
    return sum(x.total(1) for x in norm_saved("attn_norm", c, s)) if s.lora else 0


def activation_bytes(c: ModelConfig, s: Setting) -> int:
    """Saved bytes at the forward's end, or (checkpointed) while the last block is recomputed in backward."""
    tokens, targets = s.tokens, s.tokens if s.targets is None else s.targets
    block = sum(x.total(tokens) for x in block_saved(c, s))
    outside = sum(x.total(tokens) for x in outside_saved(c, s, targets))
    # Offloaded (sftplug.model.offload), at most three blocks' tensors are on the device at once: two in
    # flight and the last block's, which backward needs first.
    blocks = min(c.n_layers, OFFLOAD_BLOCKS) if s.offload else c.n_layers
    if s.grad_ckpt:  # checkpoint keeps each block's input; backward recomputes one block at a time
        return outside + blocks * c.hidden_size * residual_bytes(s) * tokens + block
    return outside + blocks * block - (first_block_unsaved(c, s) * tokens if blocks == c.n_layers else 0)


def loss_chunk_bytes(c: ModelConfig, s: Setting) -> int:
    """One chunk's logits in the compute dtype; below fp32 also their fp32 copy and the bf16 gradient; and the
    LM head cast to the compute dtype when it is stored wider."""
    rows = min(LOSS_CHUNK, s.tokens if s.targets is None else s.targets)
    a = BYTES[s.dtype]
    logits = rows * c.vocab_size * (FP32 if a == FP32 else a + FP32 + a)
    head_copy = c.vocab_size * c.hidden_size * a if not s.lora and a != FP32 else 0
    return logits + head_copy


# -- the estimate ----------------------------------------------------------------------


def estimate(c: ModelConfig, s: Setting | None = None, **options) -> Estimate:
    """The memory of one training step of ``c`` under ``s`` (or a Setting made of ``options``)."""
    s = replace(s, **options) if s is not None else Setting(**options)
    shard = s.world
    trainable = [math.ceil(n / shard) for n in trainable_tensors(c, s)]  # FSDP: each rank's shard of each tensor
    base = base_bytes(c, s)
    if s.quantized:  # the packed 4-bit data is sharded; the scales stay whole on every process
        scales = quantized_linear_bytes(c, s) - packed_bytes(c)
        base = scales + (base - scales) // shard
    else:
        base //= shard
    weights = sum(trainable) * FP32
    in_flight = 0
    if shard > 1:  # the root's weights stay gathered through the step; blocks are gathered one at a time
        dtype = FP32 if not s.lora else BYTES[s.dtype]
        block = (0 if s.quantized else block_linear_params(c)) + norm_params(c)
        packed = packed_bytes(c) // c.n_layers if s.quantized else 0  # one block's 4-bit data
        adapters = sum(lora_tensors(c, s)) // c.n_layers if s.lora else 0
        in_flight = root_params(c) * dtype + block * dtype + packed + adapters * FP32
    return Estimate(
        params=model_params(c), base=base, trainable=weights, gradients=weights,
        optimizer=optimizer_bytes(trainable, s.optimizer), in_flight=in_flight,
        activations=activation_bytes(c, s), loss_chunk=loss_chunk_bytes(c, s), saved=block_saved(c, s),
    )  # fmt: skip


# -- the README's table ------------------------------------------------------------------

TABLE_MODES = {"full (bf16 autocast, fp32 weights)": dict(mode="full"), "LoRA bf16": dict(mode="lora"),
               "QLoRA nf4": dict(mode="nf4")}
TABLE_SETTING = Setting(tokens=4096)  # one row of 4096 tokens per micro-batch, every token trained
TABLE_WORLD = 8


def table(setting: Setting = TABLE_SETTING, world: int = TABLE_WORLD) -> str:
    """The README's memory table (Markdown): bytes per parameter of the persistent part, and the peak."""
    gib = 2**30
    lines = [f"| model | mode | persistent B/param | peak GiB | + offload | + grad-ckpt | + grad-ckpt + offload | "
             f"FSDP x{world} + grad-ckpt: B/param, peak GiB per GPU |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, config in LLAMA.items():
        for label, options in TABLE_MODES.items():
            s = replace(setting, **options)
            plain = estimate(config, s)
            peaks = [estimate(config, s, offload=offload, grad_ckpt=ckpt).peak / gib
                     for ckpt, offload in ((False, False), (False, True), (True, False), (True, True))]
            sharded = estimate(config, s, grad_ckpt=True, world=world)
            lines.append(f"| {name} | {label} | {plain.per_param(plain.persistent):.2f} | "
                         + " | ".join(f"{p:.1f}" for p in peaks)
                         + f" | {sharded.per_param(sharded.persistent):.2f}, {sharded.peak / gib:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
