"""Built-in `chunked` attention: sftplug's CPU kernel (kernels/chunked_attention.py).

Causal attention in query chunks as batched matrix products, with GQA native and the
probabilities computed again in backward (memory of one chunk's scores, never T x T).
fp32 on the CPU only: there it beats SDPA's CPU flash kernel on rows of one document
up to 1024 positions, so ``auto`` takes it for those; on a GPU the fused kernels are
far faster, and half-precision softmax in plain matrix products would lose accuracy.
Packed rows run natively (one mask per chunk hides other documents); there the two
kernels measured about even, so auto keeps PyTorch's flash for packed rows.
Sliding windows, soft-capped scores, a custom scale and attention sinks (gpt-oss) are applied
exactly (a window also skips the keys before it), so on the CPU it runs Gemma- and gpt-oss-style
attention that flash cannot.
"""

from __future__ import annotations

import torch

from sftplug import hookimpl
from sftplug.attention import AttentionBackend, AttentionRequest, Priority
from sftplug.dtypes import dtype_name
from sftplug.kernels.packed_documents import one_document_per_row

# Measured against SDPA's CPU flash kernel: faster up to this many positions, slower at 2048.
FASTER_UP_TO = 1024


class Chunked(AttentionBackend):
    name = "chunked"
    description = "sftplug's CPU attention: query chunks as batched matmuls (fp32, GQA native)"
    priority = 35  # above SDPA flash (30) on the CPU: measured at W0's shapes, see BENCHMARKS.md
    host_doc_ids = True  # it runs on the CPU: nothing to move
    sliding_window = softcap = custom_scale = sinks = True  # applied in the kernel, forward and backward

    @hookimpl
    def select_attention(self, request: AttentionRequest):
        return self

    def priority_for(self, request: AttentionRequest) -> Priority:
        # Below flash where chunked is not measured faster (BENCHMARKS.md): at 2048 positions
        # flash's key tiling wins; on packed rows of short documents the two are even.
        if request.packed or request.seq_len > FASTER_UP_TO:
            return Priority(25)
        return Priority(self.priority)

    def check(self, request: AttentionRequest) -> str | None:
        if request.device.type != "cpu":
            return f"chunked attention runs on the CPU only; on {request.device.type} the fused kernels are faster"
        if request.dtype != torch.float32:
            return f"chunked attention computes in fp32 only, not {dtype_name(request.dtype)} (flash runs that)"
        return None

    def gqa_mode(self, device, dtype, head_dim) -> str:
        return "native"  # a group's query heads share one product with their K/V head

    def __call__(self, q, k, v, *, causal: bool = True, doc_ids=None, window: int = 0, softcap: float = 0.0,
                 scale: float | None = None, sinks=None):
        from sftplug.kernels.chunked_attention import chunked_attention

        if doc_ids is not None and one_document_per_row(doc_ids):
            doc_ids = None  # one document per row: only the causal diagonal (and window) need a mask
        return chunked_attention(q, k, v, causal=causal, doc_ids=doc_ids, window=window, softcap=softcap,
                                 scale=scale, sinks=sinks)


chunked = Chunked()
