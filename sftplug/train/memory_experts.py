"""What autograd keeps for a mixture of experts' feed-forward (sftplug.model.experts), for sftplug.train.memory.

Dropless top-k routing sends each of the N tokens to k experts: N·k rows through the experts,
so the experts' tensors are k per token. Counted as the PyTorch forms save them (the router,
``grouped_linear`` on ``torch._grouped_mm``, the activation) and measured against a built model by
tests/train/test_memory.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sftplug.model.config import ModelConfig
from sftplug.train.memory_shapes import FP32, Saved, expert_lora_shapes, moe_layers

if TYPE_CHECKING:
    from sftplug.train.memory import Setting

INT64, INT32 = 8, 4


def experts_saved(c: ModelConfig, s: Setting, layer: int) -> list[Saved]:
    """One MoE feed-forward's saved tensors whose input needs a gradient, per token (its norm apart).

    ``a`` is the compute dtype's size. Under bf16 autocast the grouped products cast their inputs
    (and, full, the fp32 expert weights; LoRA, the fp32 factors) to bf16 and keep the copies. Full
    fine-tuning's fp32 expert biases turn the expert outputs fp32 there.
    """
    o, a, k, hidden = c.experts, 2 if s.dtype == "bf16" else FP32, c.experts.top_k, c.hidden_size
    inter = o.intermediate_size
    out = FP32 if o.bias and not s.lora else a  # the experts' outputs: a + an fp32 bias is fp32
    found = []
    if not s.lora:  # the router's weight gradient needs its input
        found.append(Saved("router input", hidden, a))
    found += router_saved(c, s, out)
    found += [Saved("each row's token (order // k)", k, INT64), Saved("groups' ends", o.count, INT32, False)]
    if o.bias and not s.lora:  # bias[expert]'s gradient scatters by each row's expert
        found.append(Saved("each row's expert", k, INT64))
    adapters = expert_lora_shapes(c, s.lora_targets, layer) if s.lora else {}
    found.append(Saved("gate_up input (sorted rows)", k * hidden, a))
    found += lora_saved(c, s, "gate_up_proj", adapters)
    if o.activation == "clamped_swiglu":  # gpt-oss: h, clamped gate, sigmoid(alpha gate), gate sigmoid, up + 1
        found += [Saved("gate_up output", k * 2 * inter, out), Saved("activation's intermediates", k * 4 * inter, out)]
    else:  # SwiGLU: gate_up's output and silu(gate)
        found += [Saved("gate_up output", k * 2 * inter, out), Saved("silu(gate)", k * inter, out)]
    found.append(Saved("down input", k * inter, a))
    found += lora_saved(c, s, "down_proj", adapters)
    found += [Saved("each row's slot (back in token order)", k, INT64), Saved("expert outputs", k * hidden, out)]
    return found


def router_saved(c: ModelConfig, s: Setting, out: int) -> list[Saved]:
    """The router's choice and weights: softmax then top k (Qwen), or top k logits then their softmax (gpt-oss)."""
    o, a, k = c.experts, 2 if s.dtype == "bf16" else FP32, c.experts.top_k
    found = [Saved("chosen experts (top-k indices)", k, INT64)]
    if o.router == "logits":  # the softmax keeps its output, the weights
        found.append(Saved("routing weights", k, a))
        if out != a:
            found.append(Saved("routing weights in fp32 (the experts' outputs' dtype)", k, out))
        return found
    found.append(Saved("router probabilities (fp32 softmax)", o.count, FP32))
    if o.norm_top_k:  # top / top.sum(): both kept
        found += [Saved("top-k probabilities", k, FP32), Saved("their sum", 1, FP32)]
    found.append(Saved("routing weights", k, out))
    return found


def lora_saved(c: ModelConfig, s: Setting, projection: str, adapters: dict) -> list[Saved]:
    """A targeted projection's x A^T per row; under bf16 also its factors' bf16 copies (per layer)."""
    if projection not in adapters:
        return []
    i, o = adapters[projection]
    found = [Saved(f"{projection} x A^T", c.experts.top_k * s.lora_r, 2 if s.dtype == "bf16" else FP32)]
    if s.dtype == "bf16":
        found.append(Saved(f"{projection} A, B in bf16", c.experts.count * s.lora_r * (i + o), 2, False))
    return found


def balance_saved(c: ModelConfig, s: Setting) -> list[Saved]:
    """Outside the blocks: each MoE layer's router logits, which the layer keeps for the balance
    (sftplug.model.routing), and what the load-balancing loss saves (each layer's fp32 softmax, the
    real-token mask, and two per-expert sums)."""
    o, a, layers = c.experts, 2 if s.dtype == "bf16" else FP32, moe_layers(c)
    found = [Saved("router logits kept for the balance", layers * o.count, a)]
    if s.aux_loss:
        found += [Saved("load-balancing softmax", layers * o.count, FP32), Saved("real-token mask", 1, FP32),
                  Saved("load-balancing sums", o.count + 1, FP32, False)]
    return found
