"""Model FLOPs of an update and the GPU's peak: MFU next to tokens/s.

Counted from the model's shapes, as PaLM's appendix B does: every matrix product twice
its multiply-adds, forward plus backward, for the work the loss needs. The weights are read
off the model built on the meta device, so each family counts as its modules are built (Gemma 4's
layers differ in head shape, some reuse keys and values, its per-layer inputs add products):

- the blocks' linear layers: forward, the input gradient, and the weight gradient only
  for trained weights (LoRA's frozen base has none; its adapters do);
- attention's scores and weighted sum: 4 * heads * head_dim FLOPs per token and key seen
  forward, twice that backward; causal, so a token sees half a row on average;
- the LM head on target positions only (sftplug applies it nowhere else);
- a mixture of experts: the router, the k experts a token reaches and the shared expert; an
  experts' LoRA counts k / E of its adapters per token;
- a Gated DeltaNet layer: its projections and convolution, and the chunked gated delta rule's
  products (sftplug.linear_attention.pytorch: within a chunk of C tokens q k^T, the two triangular
  solves and the weighted values; across chunks three products with the Dk x Dv state).

Rows are counted as one document each: packed documents see fewer keys, so for packed
rows the attention part is an upper bound.
"""

from __future__ import annotations

import functools
import json
import os

import torch

from sftplug.linear_attention.pytorch import CHUNK
from sftplug.model.config import ModelConfig
from sftplug.model.transformer import Transformer

PEAK_ENV = "SFTPLUG_PEAK_TFLOPS"
# Dense bf16/fp16 tensor-core peaks from the vendors' data sheets, by a piece of the name
# torch.cuda.get_device_name() gives; the first match wins. SFTPLUG_PEAK_TFLOPS overrides.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("GH200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("RTX 4090", 165.2), ("RTX 3090", 71.0),
)  # fmt: skip


def update_flops(config, tokens: int, targets: int, seq_len: int, full: bool, adapter_params: float = 0) -> float:
    """Model FLOPs of one update over ``tokens`` positions with ``targets`` of them trained
    (``adapter_params``: the LoRA values a token passes through, :func:`active_adapter_params`)."""
    passes = 6 if full else 4  # forward, input gradient, weight gradient (full fine-tuning only)
    linear = passes * block_weights_per_token(config) * tokens + 6 * adapter_params * tokens
    mixing = 3 * sum(_mixing_per_token(config, i, seq_len) for i in range(config.n_layers)) * tokens
    head = (6 if full else 4) * config.hidden_size * config.vocab_size * targets
    return float(linear + mixing + head)


def block_weights_per_token(config) -> int:
    """The weights one token multiplies through: every matrix of the blocks (and of Gemma 4's per-layer
    inputs), k / E of each mixture of experts' stacked experts; not the embeddings, norms or biases."""
    return _per_token_counts(_config_key(config))[0]


def _mixing_per_token(config, layer: int, seq_len: int) -> float:
    """Forward FLOPs per token of the mixing itself (no weights): attention's scores and weighted sum over
    half a row on average (causal), or the chunked gated delta rule's products."""
    if config.layer_type(layer).mixer == "linear_attention":
        o, chunk = config.linear_attention, CHUNK
        dk, dv = o.key_head_dim, o.value_head_dim
        per_head = chunk * (2 * dk + dv) + chunk * (dk + dv) / 2 + 3 * dk * dv  # multiply-adds
        return 2 * o.value_heads * per_head
    query_width = _per_token_counts(_config_key(config))[1][layer]  # heads x head_dim: Gemma 4's differ by layer
    return 4 * query_width * (seq_len / 2)


def _config_key(config) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


@functools.lru_cache(maxsize=8)
def _per_token_counts(key: str) -> tuple[int, tuple[int, ...]]:
    """(block weights per token, each layer's query heads x head_dim), read off the model built on the
    meta device (no memory), so every family's shapes count as its modules have them."""
    config = ModelConfig.from_dict(json.loads(key))
    with torch.device("meta"):
        model = Transformer(config)
    not_products = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    not_products.add(id(model.lm_head.weight))  # counted on target positions only
    share = config.experts.top_k / config.experts.count if config.experts.count else 1.0
    weights = 0.0
    for name, p in model.named_parameters():
        if id(p) in not_products or p.dim() < 2:
            continue
        weights += p.numel() * (share if ".experts." in name and p.dim() == 3 else 1.0)
    widths = tuple(getattr(block.attn, "n_heads", 0) * getattr(block.attn, "head_dim", 0) for block in model.layers)
    return round(weights), widths


def active_adapter_params(named_params, config) -> float:
    """LoRA values a token passes through: all of a linear layer's, k / E of an experts' adapters."""
    share = config.experts.top_k / config.experts.count if config.experts.count else 1.0
    return sum(p.numel() * (share if ".experts.lora." in name else 1.0) for name, p in named_params)


def peak_flops(device: torch.device, half: bool) -> float | None:
    """The peak FLOP/s MFU is measured against: ``SFTPLUG_PEAK_TFLOPS``, else the device's
    bf16/fp16 peak for a bf16/fp16 run on a known GPU, else None (no MFU)."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]) * 1e12
    if device.type != "cuda" or not half:
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for piece, tflops in PEAK_TFLOPS if piece in name), None)
