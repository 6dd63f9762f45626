"""The Gated DeltaNet token mixer (the linear-attention layers of Qwen3.5 and Qwen3-Next), as
transformers defines it: input projections, a depthwise causal convolution with SiLU, q and k
L2-normalised, β = sigmoid(b), the decay g = −exp(A_log) · softplus(a + dt_bias), the gated
delta rule (sftplug.linear_attention), an RMSNorm gated by SiLU(z), and ``out_proj``.

In packed rows neither the convolution nor the recurrence crosses a document: the convolution
reads only earlier tokens of the token's own document, and the recurrent state starts from zero
at every document's first token. The projections keep the family's names and layout (LoRA
targets them as PEFT does); generation keeps the convolution's last inputs and the recurrent
state (:class:`LinearCache`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sftplug.linear_attention.pytorch import gated_delta_rule
from sftplug.model.config import ModelConfig


class LinearCache:
    """Generation's state of one linear-attention layer: the convolution's last inputs and the recurrent state."""

    def __init__(self):
        self.conv = None  # [B, conv_dim, kernel - 1]
        self.state = None  # [B, Hv, Dk, Dv] fp32


class GatedRMSNorm(nn.Module):
    """weight · normalize(x), times SiLU(z) in fp32 (transformers' RMSNormGated)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x, z):
        h = x.float()
        h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (h * F.silu(z.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        o = config.linear_attention
        self.hk, self.hv, self.dk, self.dv = o.key_heads, o.value_heads, o.key_head_dim, o.value_head_dim
        self.grouped = o.projections == "grouped"
        c, key, value = config.hidden_size, o.key_heads * o.key_head_dim, o.value_heads * o.value_head_dim
        self.conv_dim = 2 * key + value
        if self.grouped:  # Qwen3-Next: per key head [q, k, v..., z...] and [b..., a...]
            self.in_proj_qkvz = nn.Linear(c, 2 * key + 2 * value, bias=False)
            self.in_proj_ba = nn.Linear(c, 2 * o.value_heads, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(c, self.conv_dim, bias=False)
            self.in_proj_z = nn.Linear(c, value, bias=False)
            self.in_proj_b = nn.Linear(c, o.value_heads, bias=False)
            self.in_proj_a = nn.Linear(c, o.value_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, o.conv_kernel, groups=self.conv_dim, bias=False,
                                padding=o.conv_kernel - 1)
        self.dt_bias = nn.Parameter(torch.ones(o.value_heads))
        self.A_log = nn.Parameter(torch.zeros(o.value_heads))
        self.norm = GatedRMSNorm(o.value_head_dim, config.norm.eps)
        self.out_proj = nn.Linear(value, c, bias=False)
        self.backend = gated_delta_rule  # or another linear-attention backend's

    def forward(self, x, cos=None, sin=None, doc_ids=None, cache: LinearCache | None = None):
        b, t, _ = x.shape
        if doc_ids is not None:  # the attention layers' backend may keep them on the host
            doc_ids = doc_ids.to(x.device, non_blocking=True)
        qkv, z, beta_in, a = self.projections(x)
        qkv = self.convolve(qkv, doc_ids, cache)
        q, k, v = qkv.split([self.hk * self.dk, self.hk * self.dk, self.hv * self.dv], dim=-1)
        q, k = (_l2norm(y.reshape(b, t, self.hk, self.dk)) for y in (q, k))
        v = v.reshape(b, t, self.hv, self.dv)
        beta = beta_in.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        if cache is None:
            y = self.backend(q, k, v, g, beta, doc_ids)
        else:
            y, cache.state = gated_delta_rule(q, k, v, g, beta, initial_state=cache.state, final_state=True)
        y = self.norm(y, z.reshape(b, t, self.hv, self.dv))
        return self.out_proj(y.reshape(b, t, self.hv * self.dv))

    def projections(self, x):
        """(q|k|v before the convolution [B, T, conv_dim], z [B, T, Hv·Dv], b [B, T, Hv], a [B, T, Hv])."""
        if not self.grouped:
            return self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)
        b, t, _ = x.shape
        per = self.hv // self.hk  # value heads per key head
        qkvz = self.in_proj_qkvz(x).view(b, t, self.hk, 2 * self.dk + 2 * per * self.dv)
        q, k, v, z = qkvz.split([self.dk, self.dk, per * self.dv, per * self.dv], dim=-1)
        beta, a = self.in_proj_ba(x).view(b, t, self.hk, 2 * per).split([per, per], dim=-1)
        qkv = torch.cat([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)], dim=-1)
        return qkv, z.reshape(b, t, -1), beta.reshape(b, t, -1), a.reshape(b, t, -1)

    def convolve(self, x, doc_ids, cache: LinearCache | None):
        """The depthwise causal convolution and SiLU over x [B, T, D]: each token sees the kernel's width of
        earlier tokens of its own document (and, generating, the cached inputs before them)."""
        width = self.conv1d.kernel_size[0]
        past = x.new_zeros(x.shape[0], width - 1, x.shape[2]) if cache is None or cache.conv is None else cache.conv
        padded = torch.cat([past.to(x.dtype), x], dim=1)  # [B, width - 1 + T, D]
        if cache is not None:
            cache.conv = padded[:, -(width - 1):]
        same = None
        if doc_ids is not None:  # same[..., back - 1]: the token `back` places before is of the token's document
            docs = F.pad(doc_ids.long(), (width - 1, 0), value=-1)
            t = x.shape[1]
            same = torch.stack([docs[:, width - 1 - back: width - 1 - back + t] == doc_ids.long()
                                for back in range(1, width)], dim=-1)
        return CausalConvSiLU.apply(padded, self.conv1d.weight[:, 0], same)

    def new_cache(self) -> LinearCache:
        return LinearCache()

    def set_fused_ops(self, ops) -> None:
        pass  # its norm is gated, not one of the fused RMSNorm's forms


class CausalConvSiLU(torch.autograd.Function):
    """SiLU(Σ_back w[:, width-1-back] · x[t - back] · same[t, back - 1]) over ``padded`` [B, width-1 + T, D]
    (x after width - 1 leading inputs), weight [D, width], same [B, T, width - 1] or None (all 1).

    Written out so that backward keeps the pre-activation (and the input, where the weight trains) and
    each tap accumulates in place: autograd of the taps as tensor operations makes and keeps a tensor
    per tap and per mask."""

    @staticmethod
    def forward(ctx, padded, weight, same):
        width = weight.shape[1]
        t = padded.shape[1] - (width - 1)
        pre = padded[:, width - 1:] * weight[:, width - 1]
        for back in range(1, width):
            earlier = padded[:, width - 1 - back: width - 1 - back + t]
            pre.addcmul_(earlier if same is None else earlier * same[..., back - 1:back], weight[:, width - 1 - back])
        ctx.padded_length, ctx.dtype = padded.shape[1], padded.dtype
        ctx.save_for_backward(padded if ctx.needs_input_grad[1] else None, weight, same, pre)  # the input: for w's
        return F.silu(pre)

    @staticmethod
    def backward(ctx, grad_out):
        padded, weight, same, pre = ctx.saved_tensors
        width = weight.shape[1]
        t = pre.shape[1]
        grad_pre = torch.ops.aten.silu_backward(grad_out, pre)
        grad_padded = grad_weight = None
        if ctx.needs_input_grad[0]:  # summed in the pre-activation's dtype
            grad_padded = grad_pre.new_zeros(grad_pre.shape[0], ctx.padded_length, grad_pre.shape[2])
            grad_padded[:, width - 1:] = grad_pre * weight[:, width - 1]
        if ctx.needs_input_grad[1]:
            grad_weight = torch.empty_like(weight)
            grad_weight[:, width - 1] = (grad_pre * padded[:, width - 1:]).sum((0, 1))
        for back in range(1, width):
            masked = grad_pre if same is None else grad_pre * same[..., back - 1:back]
            earlier = slice(width - 1 - back, width - 1 - back + t)
            if grad_padded is not None:
                grad_padded[:, earlier].addcmul_(masked, weight[:, width - 1 - back])
            if grad_weight is not None:
                grad_weight[:, width - 1 - back] = (masked * padded[:, earlier]).sum((0, 1))
        return None if grad_padded is None else grad_padded.to(ctx.dtype), grad_weight, None


def _l2norm(x, eps: float = 1e-6):
    """As transformers normalises q and k for the kernel: in fp32, x · rsqrt(Σ x² + eps)."""
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)
