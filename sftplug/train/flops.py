"""Model FLOPs of an update and the GPU's peak: MFU next to tokens/s.

Counted from the model's shapes, as PaLM's appendix B does: every matrix product twice
its multiply-adds, forward plus backward, for the work the loss needs:

- the blocks' linear layers: forward, the input gradient, and the weight gradient only
  for trained weights (LoRA's frozen base has none; its adapters do);
- attention's scores and weighted sum: 4 * heads * head_dim FLOPs per token and key seen
  forward, twice that backward; causal, so a token sees half a row on average;
- the LM head on target positions only (sftplug applies it nowhere else).

Rows are counted as one document each: packed documents see fewer keys, so for packed
rows the attention part is an upper bound.
"""

from __future__ import annotations

import os

import torch

PEAK_ENV = "SFTPLUG_PEAK_TFLOPS"
# Dense bf16/fp16 tensor-core peaks from the vendors' data sheets, by a piece of the name
# torch.cuda.get_device_name() gives; the first match wins. SFTPLUG_PEAK_TFLOPS overrides.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("GH200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("RTX 4090", 165.2), ("RTX 3090", 71.0),
)  # fmt: skip


def update_flops(config, tokens: int, targets: int, seq_len: int, full: bool, adapter_params: int = 0) -> float:
    """Model FLOPs of one update over ``tokens`` positions with ``targets`` of them trained."""
    h, q, kv, inter = config.hidden_size, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, (
        config.intermediate_size
    )
    block_weights = config.n_layers * (h * (q + 2 * kv) + q * h + 3 * h * inter)
    passes = 6 if full else 4  # forward, input gradient, weight gradient (full fine-tuning only)
    linear = passes * block_weights * tokens + 6 * adapter_params * tokens
    attention = 3 * 4 * config.n_layers * q * (seq_len / 2) * tokens
    head = (6 if full else 4) * h * config.vocab_size * targets
    return float(linear + attention + head)


def peak_flops(device: torch.device, half: bool) -> float | None:
    """The peak FLOP/s MFU is measured against: ``SFTPLUG_PEAK_TFLOPS``, else the device's
    bf16/fp16 peak for a bf16/fp16 run on a known GPU, else None (no MFU)."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]) * 1e12
    if device.type != "cuda" or not half:
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for piece, tflops in PEAK_TFLOPS if piece in name), None)
