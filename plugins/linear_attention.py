"""Built-in `linear` plugin: the backends of the gated delta rule (Gated DeltaNet layers).

- ``pytorch``: the chunked PyTorch form (sftplug.linear_attention.pytorch), the reference; it runs
  everywhere, with memory of the chunked tensors.
"""

from __future__ import annotations

from sftplug import hookimpl
from sftplug.linear_attention.backend import LinearAttentionBackend, LinearAttentionRequest


class PyTorchChunked(LinearAttentionBackend):
    name = "pytorch"
    description = "the gated delta rule in PyTorch, a chunk of 64 tokens at a time (the reference)"
    priority = 10

    def __call__(self, q, k, v, g, beta, doc_ids=None):
        from sftplug.linear_attention.pytorch import gated_delta_rule

        return gated_delta_rule(q, k, v, g, beta, doc_ids)


class LinearAttentionPlugin:
    @hookimpl
    def select_linear_attention(self, request: LinearAttentionRequest):
        return [PyTorchChunked()]


linear = LinearAttentionPlugin()
