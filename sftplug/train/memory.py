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

The model's tensors are counted in sftplug.train.memory_shapes, a mixture of experts' saved
tensors (k rows per token through the experts) in sftplug.train.memory_experts, a Gated DeltaNet
layer's (its convolution, the gated delta rule's chunk buffers and states) in
sftplug.train.memory_hybrid; the table's models are in sftplug.train.memory_models.

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
from sftplug.train import memory_shapes as shapes
from sftplug.train.loss import CHUNK_ROWS as LOSS_CHUNK
from sftplug.train.memory_experts import balance_saved, experts_saved
from sftplug.train.memory_hybrid import LINEAR_ATTENTION, linear_attention_saved
from sftplug.train.memory_models import LLAMA, hybrid_shapes, moe_shapes, table_models  # noqa: F401 - public here
from sftplug.train.memory_shapes import (
    Saved,
    buffer_bytes,
    linear_shapes,
    lora_shapes,
    model_params,
    quantized_bytes,  # noqa: F401 - public here since the split
    root_params,
)

FP32, BF16, INT64, INT32 = 4, 2, 8, 4
BYTES = {"fp32": FP32, "bf16": BF16}
MODES = ("full", "lora", "nf4", "fp4")  # nf4/fp4: QLoRA, LoRA on a 4-bit base
OPTIMIZERS = ("adamw", "adamw8bit")
# SDPA's flash kernel (GPU and CPU), sftplug's chunked CPU kernel, sftplug's Triton kernel (sinks: gpt-oss on GPUs)
ATTENTION = ("flash", "chunked", "triton")
ADAM8_BLOCK, ADAM8_MIN_SIZE = 256, 4096  # bitsandbytes' 8-bit state: blocks, and the size below which it is fp32
OFFLOAD_BLOCKS = 3  # blocks whose saved tensors are on the device at once with --offload-activations

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
    linear_attention: str = "triton"  # the gated delta rule's backend (--linear-attention): triton or pytorch
    seq_len: int = 0  # tokens per row (--seq-len); 0: the micro-batch is one row
    lora_r: int = 16
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    double_quant: bool = True
    aux_loss: bool = True  # a mixture's load-balancing loss is trained (--router-aux-loss-coef not 0)

    def __post_init__(self):
        for name, allowed in (("mode", MODES), ("dtype", tuple(BYTES)), ("optimizer", OPTIMIZERS),
                              ("attention", ATTENTION), ("linear_attention", LINEAR_ATTENTION)):
            if getattr(self, name) not in allowed:
                raise SftplugError(f"memory model: {name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.attention == "chunked" and self.dtype != "fp32":
            raise SftplugError("memory model: chunked attention computes in fp32 only; use dtype fp32 or flash")
        if self.world < 1 or self.tokens < 1:
            raise SftplugError("memory model: world and tokens must be at least 1")
        if self.seq_len < 0 or (self.seq_len and self.tokens % self.seq_len):
            raise SftplugError(f"memory model: {self.tokens} tokens are not rows of seq_len {self.seq_len}")

    @property
    def lora(self) -> bool:
        return self.mode != "full"

    @property
    def quantized(self) -> bool:
        return self.mode in ("nf4", "fp4")


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


# -- the model's tensors (counted in sftplug.train.memory_shapes) ----------------------------


def trainable_tensors(c: ModelConfig, s: Setting) -> list[int]:
    """Elements of every trainable tensor: the adapters, or (full) every weight."""
    return shapes.trainable_tensors(c, s.lora, s.lora_r, s.lora_targets)


def lora_tensors(c: ModelConfig, s: Setting) -> list[int]:
    return shapes.lora_tensors(c, s.lora_r, s.lora_targets)


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
    if not s.quantized:
        return model_params(c) * dtype + buffer_bytes(c)
    linears = c.n_layers * sum(i * o for i, o in linear_shapes(c).values())
    return (shapes.quantized_linear_bytes(c, s.double_quant) + (model_params(c) - linears) * dtype
            + buffer_bytes(c))


# -- activations -----------------------------------------------------------------------


def block_saved(c: ModelConfig, s: Setting, layer: int = 0) -> list[Saved]:
    """What autograd keeps for block ``layer`` whose input needs a gradient, per token.

    The residual stream is fp32 unless a LoRA base is bf16; each RMSNorm keeps its input in
    fp32 and the reciprocal RMS (full fine-tuning also the normalized input, for its scale's
    gradient); each linear keeps its input in the compute dtype (LoRA also x A^T); SwiGLU keeps
    the gate/up output and silu(gate). A mixture of experts: sftplug.train.memory_experts.
    """
    a = BYTES[s.dtype]
    lora_layers = lora_shapes(c, s.lora_targets, layer) if s.lora else {}
    adapters = {name: n * s.lora_r for name, (_, _, n) in lora_layers.items()}
    saved = norm_saved("attn_norm", c, s)
    if shapes.is_linear_attention(c, layer):
        saved += linear_attention_saved(c, s, adapters)
    else:
        saved += [Saved("qkv input", c.hidden_size, a)] + lora_saved("qkv", adapters, a) + qk_norm_saved(c, s)
        saved += attention_saved(c, s, layer) + lora_saved("o", adapters, a)
    saved += norm_saved("mlp_norm", c, s)
    if shapes.is_moe(c, layer):
        saved += experts_saved(c, s, layer)
    else:
        inter = c.intermediate_size
        saved += [Saved("gate_up input", c.hidden_size, a)] + lora_saved("gate_up", adapters, a)
        saved += [Saved("gate_up output", 2 * inter, a), Saved("silu(gate)", inter, a), Saved("down input", inter, a)]
        saved += lora_saved("down", adapters, a)
    return [x for x in saved if x.elements]


def norm_saved(name: str, c: ModelConfig, s: Setting) -> list[Saved]:
    """An RMSNorm's input in fp32 and 1/rms; Gemma's form (1 + w) also 1 + w, made in fp32 at each call;
    full fine-tuning also the normalized input (fp32 in Gemma's form), for its scale's gradient."""
    saved = [Saved(f"{name} input in fp32", c.hidden_size, FP32), Saved(f"{name} 1/rms", 1, FP32)]
    if c.norm.gemma:
        saved.append(Saved(f"{name} 1 + w", c.hidden_size, FP32, per_token=False))
    if not s.lora:
        saved.append(Saved(f"{name} normalized", c.hidden_size, FP32 if c.norm.gemma else residual_bytes(s)))
    return saved


def lora_saved(layer: str, adapters: dict[str, int], a: int) -> list[Saved]:
    return [Saved(f"{layer} x A^T", adapters[layer], a)] if layer in adapters else []


def qk_norm_saved(c: ModelConfig, s: Setting) -> list[Saved]:
    """The q/k RMSNorms' input in fp32 (in fp32 compute: views of the qkv output, all of it kept), their
    1/rms (per head, or per token over the projection) and, full, their normalized input."""
    if not c.attention.qk_norm:
        return []
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    a = BYTES[s.dtype]
    rms = c.n_heads + c.n_kv_heads if c.attention.qk_norm == "head" else 2
    saved = [Saved("q, k in fp32", q + 2 * kv if a == FP32 else q + kv, FP32), Saved("q, k 1/rms", rms, FP32)]
    if c.norm.gemma:  # q_norm's and k_norm's 1 + w
        scales = 2 * c.head_dim if c.attention.qk_norm == "head" else q + kv
        saved.append(Saved("q, k norms' 1 + w", scales, FP32, per_token=False))
    if not s.lora:
        saved.append(Saved("q, k normalized", q + kv, FP32 if c.norm.gemma else a))
    return saved


def attention_saved(c: ModelConfig, s: Setting, layer: int = 0) -> list[Saved]:
    """The attention kernel's saved tensors and the o projection's input; with output gates (Qwen3.5) also
    their sigmoid and the attention output they scale (o's input is then their product, copied token-major)."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    a = BYTES[s.dtype]
    gates = [Saved("output gates' sigmoid", q, a)] if c.attention.output_gate else []
    if s.attention == "flash":  # q, k, v (views of RoPE's output), the output (o's input) and the log-sum-exp
        if gates:
            return [Saved("q, k, v after RoPE", q + 2 * kv, a), Saved("attention output", q, a),
                    Saved("log-sum-exp", c.n_heads, FP32), *gates, Saved("o input (the gated output)", q, a)]
        return [Saved("q, k, v after RoPE", q + 2 * kv, a), Saved("attention output (o input)", q, a),
                Saved("log-sum-exp", c.n_heads, FP32)]
    if s.attention == "triton":  # its output is head-major: o's input is a copy; a window's rows get ranges
        ranges = [Saved("each row's key ranges (a window shorter than the row)", 4, INT32)] if c.attention.window(
            layer) else []
        return [Saved("q, k, v after RoPE", q + 2 * kv, a), Saved("attention output", q, a),
                Saved("log-sum-exp", c.n_heads, FP32), Saved("o input", q, a)] + ranges + gates
    if gates:  # the kernel's own output is not the tensor it returns
        gates.append(Saved("attention output as returned", q, FP32))
    return [Saved("scaled q", q, FP32), Saved("k, v (grouped copies)", 2 * kv, FP32),
            Saved("attention output", q, FP32), Saved("o input", q, FP32)] + gates


def residual_bytes(s: Setting) -> int:
    return BYTES[s.dtype] if s.lora else FP32  # full fine-tuning keeps fp32 weights, so fp32 activations between ops


def outside_saved(c: ModelConfig, s: Setting, targets: int) -> list[Saved]:
    """Saved outside the blocks: RoPE's cos and sin (shared by every layer), the embedding's indices (full),
    the final norm, and the loss: target indices and the hidden states' gradient (and the LM head's, full);
    a mixture's router logits and load-balancing loss (sftplug.train.memory_experts)."""
    a, r = BYTES[s.dtype], residual_bytes(s)
    saved = [Saved("cos, sin", c.rotary.dims, a)] + norm_saved("norm", c, s)
    saved += [Saved("target indices", targets, INT64, per_token=False),
              Saved("hidden-state gradient of the targets", targets * c.hidden_size, r, per_token=False)]
    if not s.lora:
        saved += [Saved("input ids", 1, INT64), Saved("LM head gradient", c.vocab_size * c.hidden_size, FP32, False)]
        if s.dtype == "bf16":  # autocast (and the experts' grouped products) keep a bf16 copy of each block weight
            matrices = sum(shapes.block_matrices(c, i) for i in range(c.n_layers))
            saved.append(Saved("bf16 copies of the block weights", matrices, BF16, False))
    if c.has_experts:
        saved += balance_saved(c, s)
    return saved


def first_block_unsaved(c: ModelConfig, s: Setting, tokens: int) -> int:
    """Bytes the first block does not keep under LoRA: its input (the frozen embedding's output) needs no
    gradient, so its first norm keeps nothing."""
    return sum(x.total(tokens) for x in norm_saved("attn_norm", c, s)) if s.lora else 0


def activation_bytes(c: ModelConfig, s: Setting) -> int:
    """Saved bytes at the forward's end, or (checkpointed) while the largest block is recomputed in backward."""
    tokens, targets = s.tokens, s.tokens if s.targets is None else s.targets
    blocks = sorted((sum(x.total(tokens) for x in block_saved(c, s, i)) for i in range(c.n_layers)), reverse=True)
    outside = sum(x.total(tokens) for x in outside_saved(c, s, targets))
    # Offloaded (sftplug.model.offload), at most three blocks' tensors are on the device at once: two in
    # flight and the last block's, which backward needs first (counted here as the three largest).
    kept = blocks[:OFFLOAD_BLOCKS] if s.offload else blocks
    if s.grad_ckpt:  # checkpoint keeps each block's input; backward recomputes one block at a time
        return outside + len(kept) * c.hidden_size * residual_bytes(s) * tokens + blocks[0]
    return outside + sum(kept) - (first_block_unsaved(c, s, tokens) if len(kept) == c.n_layers else 0)


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
    shapes.check_modelled(c)
    if s.quantized and c.has_experts:  # as sftplug.model.quantize.check_quantizable refuses it
        raise SftplugError(f"memory model: sftplug refuses --quantize {s.mode} on a mixture of experts (its stacked "
                           "experts are not quantized in 4-bit); use lora or full")
    if s.quantized and shapes.is_hybrid(c):
        raise SftplugError(f"memory model: --quantize {s.mode} on Gated DeltaNet layers is not modelled yet; use lora "
                           "or full")
    shard = s.world
    trainable = [math.ceil(n / shard) for n in trainable_tensors(c, s)]  # FSDP: each rank's shard of each tensor
    base = base_bytes(c, s)
    if s.quantized:  # the packed 4-bit data is sharded; the scales stay whole on every process
        scales = shapes.quantized_linear_bytes(c, s.double_quant) - shapes.packed_bytes(c)
        base = scales + (base - scales) // shard
    else:
        base //= shard
    weights = sum(trainable) * FP32
    in_flight = 0
    if shard > 1:  # the root's weights stay gathered through the step; blocks are gathered one at a time
        in_flight = root_params(c) * (FP32 if not s.lora else BYTES[s.dtype]) + gathered_block_bytes(c, s)
    return Estimate(
        params=model_params(c), base=base, trainable=weights, gradients=weights,
        optimizer=optimizer_bytes(trainable, s.optimizer), in_flight=in_flight,
        activations=activation_bytes(c, s), loss_chunk=loss_chunk_bytes(c, s), saved=block_saved(c, s),
    )  # fmt: skip


def gathered_block_bytes(c: ModelConfig, s: Setting) -> int:
    """FSDP: the largest block's weights gathered whole (a 4-bit base: its packed data and dense rest; LoRA:
    also its fp32 adapters)."""
    dtype = FP32 if not s.lora else BYTES[s.dtype]
    largest = 0
    for layer in range(c.n_layers):
        params = shapes.block_params(c, layer)
        if s.quantized:  # the block linears as their 4-bit data, the rest dense
            linear = linear_shapes(c).values()
            gathered = (params - sum(i * o for i, o in linear)) * dtype + sum(math.ceil(i * o / 2) for i, o in linear)
        else:
            gathered = params * dtype
        adapters = sum(shapes.block_lora_tensors(c, s.lora_r, s.lora_targets, layer)) if s.lora else 0
        largest = max(largest, gathered + adapters * FP32)
    return largest


# -- the README's table ------------------------------------------------------------------

TABLE_MODES = {"full (bf16 autocast, fp32 weights)": dict(mode="full"), "LoRA bf16": dict(mode="lora"),
               "QLoRA nf4": dict(mode="nf4")}  # QLoRA: attention-only dense models (sftplug refuses it on a mixture)
TABLE_SETTING = Setting(tokens=4096)  # one row of 4096 tokens per micro-batch, every token trained
TABLE_WORLD = 8


def table(setting: Setting = TABLE_SETTING, world: int = TABLE_WORLD) -> str:
    """The README's memory table (Markdown): bytes per parameter of the persistent part, and the peak."""
    gib = 2**30
    lines = [f"| model | mode | persistent B/param | peak GiB | + offload | + grad-ckpt | + grad-ckpt + offload | "
             f"FSDP x{world} + grad-ckpt: B/param, peak GiB per GPU |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, config in table_models().items():
        for label, options in TABLE_MODES.items():
            if (config.has_experts or shapes.is_hybrid(config)) and options["mode"] == "nf4":
                continue
            s = replace(setting, **options)
            if config.attention.sinks:  # no flash kernel applies sinks: sftplug's Triton kernel does
                s = replace(s, attention="triton")
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
