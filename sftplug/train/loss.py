"""Cross-entropy on target positions only, the LM head applied in chunks.

Prompt positions (label -100) never reach the LM head. The forward pass computes the
gradients of each chunk right away, so logits never exist for more than one chunk.
"""

from __future__ import annotations

import torch

from sftplug.data.packing import IGNORE
from sftplug.fused import pytorch


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) with gradients for h (and W when it trains).

    ``cross_entropy`` is the per-chunk step (the ``cross_entropy`` op of
    :mod:`sftplug.fused.op`): the loss of a chunk's logits and their gradient. The logits
    are ``h @ W^T`` divided by ``logit_scale`` and soft-capped at ``logit_softcap`` when the
    model says so (Granite, Gemma 2; sftplug.model.transformer.logits_of).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, compute_dtype, cross_entropy, logit_scale=1.0,
                logit_softcap=0.0):
        # hidden: [N, C]; weight: [V, C]; targets: [N]
        w = weight.to(compute_dtype)
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # fp32 at least
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size].to(compute_dtype)  # [n, C]
            logits = h @ w.t()  # [n, V]
            if logit_scale != 1.0:
                logits.div_(logit_scale)
            if logit_softcap:
                capped = torch.tanh(logits / logit_softcap)
                logits = capped * logit_softcap
            loss, g = cross_entropy(logits, targets[start : start + chunk_size])  # g: [n, V]
            if logit_softcap:
                g = g * (1 - capped * capped)
            if logit_scale != 1.0:
                g = g / logit_scale
            total += loss
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = (g @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (g.t() @ h).to(acc_dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out if grad_hidden is not None else None
        gw = (grad_weight * grad_out).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None, None, None


CHUNK_ROWS = 4096  # target rows whose logits exist at once (sftplug.train.memory counts them)


def target_loss_sum(hidden, labels, weight, chunk_size: int = CHUNK_ROWS, cross_entropy=pytorch.cross_entropy,
                    logit_scale: float = 1.0, logit_softcap: float = 0.0):
    """(sum of token losses, number of targets) for hidden [B, T, C] and labels [B, T].

    ``labels`` may stay on the host: the target positions are found there and only their
    index moves to the device, so no boolean mask is applied on the GPU (a sync).
    ``cross_entropy``: the chosen form of the per-chunk step; ``logit_scale``, ``logit_softcap``:
    the model's logit transforms.
    """
    flat = labels.reshape(-1)
    where = (flat != IGNORE).nonzero().squeeze(1)  # [N], on the labels' device
    y = flat.index_select(0, where).to(hidden.device, non_blocking=True)  # [N]
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, where.to(hidden.device, non_blocking=True))  # [N, C]
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    with torch.autocast(device_type, enabled=False):
        total = ChunkedLinearCrossEntropy.apply(h, weight, y, chunk_size, compute_dtype, cross_entropy, logit_scale,
                                                logit_softcap)
    return total, y.numel()
