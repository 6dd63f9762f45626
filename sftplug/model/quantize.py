"""QLoRA: the frozen base's block weights kept in 4-bit through bitsandbytes (``--quantize``).

Each block's ``attn.qkv``, ``attn.o``, ``mlp.gate_up`` and ``mlp.down`` becomes a
``bitsandbytes.nn.Linear4bit`` holding a ``Params4bit``: blocks of 64 weights as 4-bit codes
(nf4 or fp4) and one scale per block, the scales themselves 8-bit with double quantization.
Embeddings, norms and the LM head stay as they are. The weights are quantized from the
dtype the spec names (by default the dtype they were loaded in), and dequantizing gives that
dtype back.

Every quantized linear computes with its dequantized weight in the compute dtype (the
autocast dtype, else the input's), dequantized again for the input gradient in backward, so
no dense copy lives from forward to backward; bitsandbytes' own CPU inference path (weights
repacked for a bf16 kernel) is never taken. sftplug's LoRA layers do the same
(:func:`sftplug.model.merged_lora.merged_weight` calls :func:`dense_weight`).
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sftplug import probes
from sftplug.dtypes import dtype_name
from sftplug.errors import SftplugError

KINDS = ("nf4", "fp4")
BLOCKSIZE = 64
BLOCK_LINEARS = ("qkv", "o", "gate_up", "down")  # each block's linear layers; the LM head stays dense


@dataclass(frozen=True)
class QuantSpec:
    """How the base is quantized: the 4-bit data type, whether the block scales are quantized too,
    and the dtype the weights are rounded to before quantizing (None: the dtype they were loaded in)."""

    kind: str  # nf4 or fp4
    double_quant: bool = True
    dtype: torch.dtype | None = None


def quant_spec(kind: str, double_quant: bool = True, dtype: torch.dtype | None = None) -> QuantSpec | None:
    """``--quantize KIND`` as a spec; None for "none"."""
    return None if kind == "none" else QuantSpec(kind, double_quant, dtype)


def bitsandbytes(spec: QuantSpec):
    return probes.import_bitsandbytes(f"--quantize {spec.kind}")


def is_quantized(param) -> bool:
    return getattr(param, "quant_state", None) is not None


def numel(param) -> int:
    """The number of weights a parameter stands for (a 4-bit one stores two per byte)."""
    return param.quant_state.shape.numel() if is_quantized(param) else param.numel()


def block_linear_names(model: nn.Module) -> list[str]:
    """The names of the dense linear layers :func:`quantize_model` quantizes."""
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and name.startswith("layers.") and name.rsplit(".", 1)[-1] in BLOCK_LINEARS]


def quantize_linear(linear: nn.Linear, weight: torch.Tensor, spec: QuantSpec) -> nn.Linear:
    """A Linear4bit equal to ``linear`` with ``weight`` quantized (on its device); ``linear``'s bias
    parameter itself is kept (a loader may fill it later)."""
    bnb = bitsandbytes(spec)
    dtype = spec.dtype or weight.dtype
    packed, state = bnb.functional.quantize_4bit(weight.detach().to(dtype).contiguous(), blocksize=BLOCKSIZE,
                                                 compress_statistics=spec.double_quant, quant_type=spec.kind)
    with torch.device("meta"):  # no storage: the weight is replaced next, the bias is linear's
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                                  compress_statistics=spec.double_quant, quant_type=spec.kind)
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE,
                                     compress_statistics=spec.double_quant, quant_type=spec.kind, module=layer,
                                     bnb_quantized=True)
    layer.quant_state = state
    layer.bias = linear.bias
    layer.forward = types.MethodType(_forward, layer)
    return layer


def check_quantizable(config, kind: str, where: str) -> None:
    """Refuse, in one line, a model whose weights --quantize would not quantize as it quantizes a dense model's."""
    if config.has_experts:
        raise SftplugError(f"--quantize {kind}: {where} is a mixture of experts, and sftplug does not quantize its "
                           "stacked experts (most of its weights) in 4-bit; train it with LoRA in bf16, or --full")
    if any(config.layer_type(i).mixer == "linear_attention" for i in range(config.n_layers)):
        raise SftplugError(f"--quantize {kind}: {where} has Gated DeltaNet layers, whose projections sftplug does not "
                           "quantize in 4-bit yet; train it with LoRA in bf16, or --full")
    if config.architecture == "gemma4_text":
        raise SftplugError(f"--quantize {kind}: {where} is a Gemma 4, whose separate q/k/v projections sftplug does "
                           "not quantize in 4-bit yet; train it with LoRA in bf16, or --full")


def quantize_model(model: nn.Module, spec: QuantSpec) -> None:
    """Quantize a loaded model's block linears in place, one at a time (each dense weight is freed
    as its layer is replaced)."""
    check_quantizable(model.config, spec.kind, "the model")
    names = block_linear_names(model)
    if not names:
        raise SftplugError(f"--quantize {spec.kind}: the model has no dense block linears ({', '.join(BLOCK_LINEARS)} "
                           "under layers.N) to quantize")
    dtype = spec.dtype or model.get_submodule(names[0]).weight.dtype
    for name in names:
        linear = model.get_submodule(name)
        set_submodule(model, name, quantize_linear(linear, linear.weight, spec))
        del linear
    mark_quantized(model, QuantSpec(spec.kind, spec.double_quant, dtype))


def mark_quantized(model: nn.Module, spec: QuantSpec) -> None:
    """Record the spec (its dtype resolved) on the model; PEFT reads ``is_loaded_in_4bit`` to wrap
    Linear4bit layers in its bitsandbytes LoRA layers."""
    model.quantized_base = spec
    model.is_loaded_in_4bit = True


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def dense_weight(param: torch.Tensor, dtype: torch.dtype, state=None) -> torch.Tensor:
    """A weight in ``dtype``: dequantized from 4-bit (in the dtype it was quantized from, then cast),
    or an ordinary weight cast. ``state``: the layer's QuantState, for packed bytes that FSDP
    all-gathered into a plain parameter (:func:`unwrap_for_sharding`).

    The 4-bit blocks run over the flattened weight, and it is dequantized as that one row:
    bitsandbytes 0.50's CPU kernel dequantizes a 2-D weight whose rows are not whole blocks
    (e.g. 96 inputs) wrongly; as one row, every backend gives the same, right values. (1, n)
    rather than (n,): the CPU kernel returns a 1-D shape as (1, n), which torch.compile refuses.
    """
    state = state if state is not None else getattr(param, "quant_state", None)
    if state is None:
        return param.to(dtype)
    import bitsandbytes.functional

    flat = copy.copy(state)  # the same tensors, the weight as one row
    flat.shape = torch.Size([1, state.shape.numel()])
    return bitsandbytes.functional.dequantize_4bit(param.data, flat).view(state.shape).to(dtype)


def bitsandbytes_dequantizes_exactly(param: torch.Tensor) -> bool:
    """Whether bitsandbytes' own dequantization of this 2-D weight (which PEFT's DoRA uses) is right."""
    import bitsandbytes.functional

    ours = dense_weight(param, param.quant_state.dtype)
    return torch.equal(bitsandbytes.functional.dequantize_4bit(param.data, param.quant_state), ours)


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every layer holding a 4-bit weight itself (a Linear4bit, not PEFT's wrapper of it,
    whose .weight is its base's)."""
    return [(name, module) for name, module in model.named_modules()
            if is_quantized(dict(module.named_parameters(recurse=False)).get("weight"))]


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace every Linear4bit (PEFT's base layers too) by an nn.Linear with its dequantized weight."""
    for name, layer in quantized_layers(model):
        with torch.device("meta"):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=False)
        linear.weight = nn.Parameter(dense_weight(layer.weight, dtype), requires_grad=False)
        linear.bias = layer.bias
        set_submodule(model, name, linear)
    model.quantized_base = None
    model.is_loaded_in_4bit = False


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """Bytes of the quantized weights as stored (4-bit data, scales, nested scales and their code
    tables, each tensor once), and the bytes of the same weights in bf16."""
    seen: dict[int, int] = {}
    bf16 = 0
    for param in model.parameters():
        if not is_quantized(param):
            continue
        state = param.quant_state
        tensors = [param.data, state.absmax, state.code]
        if state.nested:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
        for t in tensors:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        bf16 += state.shape.numel() * torch.bfloat16.itemsize
    return sum(seen.values()), bf16


def quantized_info(model: nn.Module) -> dict:
    """What LoadedModel.info records of a quantized base."""
    spec: QuantSpec = model.quantized_base
    stored, bf16 = quantized_bytes(model)
    return {"kind": spec.kind, "double_quant": spec.double_quant, "dtype": dtype_name(spec.dtype),
            "bytes": stored, "bf16_bytes": bf16}


def describe_quantized(info: dict) -> str:
    """The load description's part, from :func:`quantized_info`: kind, dtype and the block weights'
    bytes against bf16."""
    double = ", double-quantized scales" if info["double_quant"] else ""
    stored, bf16 = info["bytes"], info["bf16_bytes"]
    return (f"block weights {info['kind']} from {info['dtype']}{double}: {_size(stored)}, "
            f"{stored / bf16:.2f}x their {_size(bf16)} in bf16")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


# -- the forward ----------------------------------------------------------------------


class DequantizedLinear(torch.autograd.Function):
    """``x W^T + b`` with W dequantized in forward and again in backward, never kept."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype: torch.dtype, state):
        with torch.autocast(x.device.type, enabled=False):  # the caller chose the compute dtype
            y = F.linear(x.to(dtype), dense_weight(weight, dtype, state), None if bias is None else bias.to(dtype))
        ctx.weight, ctx.dtype, ctx.state, ctx.batch_dims = weight, dtype, state, x.dim() - 1
        return y

    @staticmethod
    def backward(ctx, dy):
        dy = dy.to(ctx.dtype)
        dx = dy @ dense_weight(ctx.weight, ctx.dtype, ctx.state) if ctx.needs_input_grad[0] else None
        db = dy.sum(dim=tuple(range(ctx.batch_dims))) if ctx.needs_input_grad[2] else None
        return dx, None, db, None, None


def _forward(self, x):
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    return DequantizedLinear.apply(x, self.weight, self.bias, dtype, self.quant_state)


def unwrap_for_sharding(model: nn.Module) -> int:
    """Make each 4-bit weight a plain frozen parameter of its packed bytes, so FSDP2 can shard and
    all-gather it like any other; its layer keeps the QuantState (scales and shape) whole, and
    every forward reads it from there. Returns the bytes of packed weights now shardable."""
    packed = 0
    for _, layer in quantized_layers(model):  # each layer's quant_state is set by quantize_linear
        weight = layer.weight
        layer.weight = nn.Parameter(weight.data, requires_grad=False)
        packed += weight.numel() * weight.element_size()
    return packed
