"""Built-in `chunked` attention: sftplug's CPU kernel (kernels/chunked_attention.py).

Causal attention in query chunks as batched matrix products, with GQA native and the
probabilities computed again in backward (memory of one chunk's scores, never T x T).
fp32 on the CPU only: there it beats SDPA's CPU flash kernel on rows of one document
up to 1024 positions, so ``auto`` takes it for those; on a GPU the fused kernels are
far faster, and half-precision softmax in plain matrix products would lose accuracy.
Packed rows go through the same per-document buckets as the SDPA backends (correct, but
flash is faster there, so auto prefers flash for packed rows).
"""

from __future__ import annotations

import torch

from sftplug import hookimpl
from sftplug.attention import AttentionBackend, AttentionRequest
from sftplug.probes import dtype_name


# Measured against SDPA's CPU flash kernel: faster up to this many positions, slower at 2048.
FASTER_UP_TO = 1024


class Chunked(AttentionBackend):
    name = "chunked"
    description = "sftplug's CPU attention: query chunks as batched matmuls (fp32, GQA native)"
    priority = 35  # above SDPA flash (30) on the CPU: measured at W0's shapes, see BENCHMARKS.md

    @hookimpl
    def select_attention(self, request: AttentionRequest):
        return self

    def priority_for(self, request: AttentionRequest) -> int:
        # Below flash where flash measured faster (BENCHMARKS.md): at 2048 positions its key
        # tiling wins, and packed rows split into many short per-document calls.
        if request.packed or request.seq_len > FASTER_UP_TO:
            return 25
        return self.priority

    def check(self, request: AttentionRequest) -> str | None:
        if request.device.type != "cpu":
            return f"chunked attention runs on the CPU only; on {request.device.type} the fused kernels are faster"
        if request.dtype != torch.float32:
            return f"chunked attention computes in fp32 only, not {dtype_name(request.dtype)} (flash runs that)"
        return None

    def __call__(self, q, k, v, *, causal: bool = True, doc_ids=None):
        from sftplug.kernels.chunked_attention import chunked_attention
        from sftplug.plugins.sdpa import pack_plan

        def dense(q, k, v):
            return chunked_attention(q, k, v, causal=causal)

        plan = None if doc_ids is None else pack_plan(doc_ids, causal)
        return dense(q, k, v) if plan is None else plan.attend(q, k, v, dense)


chunked = Chunked()
