"""Built-in `linear` plugin: the backends of the gated delta rule (Gated DeltaNet layers).

- ``pytorch``: the chunked PyTorch form (sftplug.linear_attention.pytorch), the reference; it runs
  everywhere, with memory of the chunked tensors.
- ``triton``: sftplug's Triton chunked kernel (kernels/gated_delta_rule.py), forward and backward,
  documents restarting inside the kernel. On a CUDA GPU of compute capability 8.0+ (or under
  TRITON_INTERPRET=1, for tests); before it is offered for a dtype and head dims it runs once
  there, forward and backward, and is compared with the PyTorch form (once per process). auto
  takes it on a GPU: the PyTorch form's chunk loop launches a handful of kernels per chunk.
"""

from __future__ import annotations

import functools

import torch

from sftplug import hookimpl
from sftplug.linear_attention.backend import LinearAttentionBackend, LinearAttentionRequest, first_run_error
from sftplug.offers import Priority


class PyTorchChunked(LinearAttentionBackend):
    name = "pytorch"
    description = "the gated delta rule in PyTorch, a chunk of 64 tokens at a time (the reference)"
    priority = 10

    def __call__(self, q, k, v, g, beta, doc_ids=None):
        from sftplug.linear_attention.pytorch import gated_delta_rule

        return gated_delta_rule(q, k, v, g, beta, doc_ids)


class TritonChunked(LinearAttentionBackend):
    name = "triton"
    description = "sftplug's Triton chunked gated delta rule (fp32 state, documents restart in the kernel)"
    priority = 20

    def priority_for(self, request: LinearAttentionRequest) -> Priority:
        if request.device.type != "cuda":
            return Priority(-10, "the CPU interpreter is for tests")  # only when asked for by name
        return Priority(self.priority)

    def check(self, request: LinearAttentionRequest) -> str | None:
        from sftplug import probes
        from sftplug.kernels.gated_delta_rule import HEAD_DIMS
        from sftplug.kernels.runtime import triton_available

        ok, why = triton_available("sftplug.kernels.gated_delta_rule")
        if not ok:
            return f"triton: {why}"
        dims = (request.key_head_dim, request.value_head_dim)
        if not set(dims) <= set(HEAD_DIMS):
            return f"triton's gated delta rule takes head dims {HEAD_DIMS}, not {dims[0]}/{dims[1]}"
        if request.device.type != "cuda" and not probes.triton_interpreter():
            return f"triton's gated delta rule runs on CUDA GPUs, not {request.device.type}"
        if request.device.type != "cuda" and request.dtype == torch.bfloat16:
            return "the Triton interpreter computes bf16 wrongly; use fp32 or fp16 on the CPU"
        return first_run(str(request.device), request.dtype, *dims)

    def __call__(self, q, k, v, g, beta, doc_ids=None):
        from sftplug.kernels.gated_delta_rule import gated_delta_rule

        return gated_delta_rule(q.to(v.dtype), k.to(v.dtype), v, g, beta, doc_ids)  # q, k: normalised in fp32


@functools.cache
def first_run(device: str, dtype: torch.dtype, dim_k: int, dim_v: int) -> str | None:
    """None when one packed forward and backward (two documents, GQA) match the PyTorch form here, else why not."""
    from sftplug.kernels.gated_delta_rule import gated_delta_rule as kernel
    gen = torch.Generator().manual_seed(0)
    t = 40
    q, k = (torch.nn.functional.normalize(torch.randn(1, t, 1, dim_k, generator=gen), dim=-1) for _ in range(2))
    v, grad = torch.randn(1, t, 2, dim_v, generator=gen), torch.randn(1, t, 2, dim_v, generator=gen)
    g, beta = -torch.rand(1, t, 2, generator=gen), torch.rand(1, t, 2, generator=gen)
    doc_ids = (torch.arange(t) >= 23).int()[None]
    return first_run_error(kernel, "triton's gated delta rule", device, dtype, (q, k, v, g, beta), doc_ids, grad)


class LinearAttentionPlugin:
    @hookimpl
    def select_linear_attention(self, request: LinearAttentionRequest):
        return [PyTorchChunked(), TritonChunked()]


linear = LinearAttentionPlugin()
