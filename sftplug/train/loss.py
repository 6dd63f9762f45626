"""Cross-entropy on target positions only, the LM head applied in chunks.

Prompt positions (label -100) never reach the LM head. The forward pass computes the
gradients of each chunk right away, so logits never exist for more than one chunk.
"""

from __future__ import annotations

import torch

from sftplug.data.packing import IGNORE


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) with gradients for h (and W when it trains)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, compute_dtype):
        # hidden: [N, C]; weight: [V, C]; targets: [N]
        w = weight.to(compute_dtype)
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # fp32 at least
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size].to(compute_dtype)  # [n, C]
            y = targets[start : start + chunk_size]  # [n]
            logits = (h @ w.t()).to(acc_dtype)  # [n, V]
            # In place, a pass or two each (torch.logsumexp alone was slower, BENCHMARKS.md): shifted
            # by the row max, the sum of exponentials is at least 1, so its log is finite.
            shifted = logits.sub_(logits.amax(-1, keepdim=True))
            target = shifted.gather(1, y[:, None]).squeeze(1)  # [n]
            probs = shifted.exp_()
            sums = probs.sum(-1)  # [n]
            total += (sums.log() - target).sum()
            probs.div_(sums[:, None])  # softmax
            probs[torch.arange(len(y), device=y.device), y] -= 1  # d(loss)/d(logits)
            g = probs.to(compute_dtype)
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
        return gh, gw, None, None, None


def target_loss_sum(hidden, labels, weight, chunk_size: int = 4096):
    """(sum of token losses, number of targets) for hidden [B, T, C] and labels [B, T].

    ``labels`` may stay on the host: the target positions are found there and only their
    index moves to the device, so no boolean mask is applied on the GPU (a sync).
    """
    flat = labels.reshape(-1)
    where = (flat != IGNORE).nonzero().squeeze(1)  # [N], on the labels' device
    y = flat.index_select(0, where).to(hidden.device, non_blocking=True)  # [N]
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, where.to(hidden.device, non_blocking=True))  # [N, C]
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    with torch.autocast(device_type, enabled=False):
        total = ChunkedLinearCrossEntropy.apply(h, weight, y, chunk_size, compute_dtype)
    return total, y.numel()
