"""Built-in `triton` attention: sftplug's own fused kernel (kernels/attention.py).

Registers where Triton imports and a CUDA GPU of compute capability 8.0+ drives it, or
under TRITON_INTERPRET=1 (the CPU interpreter, used by tests). Packed rows run natively:
blocks of other documents are skipped, so it is the first choice for packed data.
"""

from __future__ import annotations

import torch

from sftplug import hookimpl
from sftplug.attention import AttentionBackend, AttentionRequest

HEAD_DIMS = (16, 32, 64, 128, 256)


class Triton(AttentionBackend):
    name = "triton"
    description = "sftplug's Triton FlashAttention-2 kernel (GQA and packed documents native)"
    priority = 28

    def why_unavailable(self) -> str | None:
        from sftplug.kernels.attention import triton_attention_available

        ok, why = triton_attention_available()
        return None if ok else why

    @hookimpl
    def select_attention(self, request: AttentionRequest):
        return self

    def priority_for(self, request: AttentionRequest) -> int:
        if request.device.type != "cuda":
            return -10  # the CPU interpreter is for tests: only when asked for by name
        return 40 if request.packed else self.priority

    def check(self, request: AttentionRequest) -> str | None:
        from sftplug import probes

        if request.head_dim not in HEAD_DIMS:
            return f"triton attention supports head dims {HEAD_DIMS}, not {request.head_dim}"
        if request.device.type == "cuda":
            if request.dtype not in (torch.float16, torch.bfloat16):
                return "triton attention on the GPU needs fp16/bf16 (use --dtype bf16)"
            return None
        if probes.triton_interpreter():
            if request.dtype == torch.bfloat16:
                return "the Triton interpreter computes bf16 wrongly; use fp32 or fp16 on the CPU"
            return None
        return f"triton attention runs on CUDA GPUs, not {request.device.type}"

    def __call__(self, q, k, v, *, causal: bool = True, doc_ids=None):
        from sftplug.kernels.attention import triton_attention

        return triton_attention(q, k, v, causal=causal, doc_ids=doc_ids)


triton = Triton()
