"""PyTorch SDPA attention backends: flash, efficient (memory-efficient), math, cudnn.

Each runs every call inside ``sdpa_kernel([its backend])``, so PyTorch can never fall
back to another kernel silently (and global flags or shell overrides do not matter).
Packed rows run one kernel call per document: exact, and no T x T mask is ever built.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sftplug import hookimpl, probes
from sftplug.attention import AttentionBackend, AttentionRequest

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class SdpaBackend(AttentionBackend):
    sdp_backend: SDPBackend
    cuda_only = True

    def why_unavailable(self) -> str | None:
        if self.cuda_only and not probes.cuda_available():
            return f"{self.name} attention needs a CUDA GPU (torch.cuda.is_available() is False)"
        return None

    @hookimpl
    def select_attention(self, request: AttentionRequest):
        return self

    def check(self, request: AttentionRequest) -> str | None:
        if self.cuda_only and request.device.type != "cuda":
            return f"{self.name} attention runs on CUDA only, not {request.device.type}"
        ok, why, _ = _probe(self.sdp_backend, request.device.type, request.dtype, request.head_dim, gqa=False)
        return None if ok else why

    def native_gqa(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        return _probe(self.sdp_backend, device.type, dtype, head_dim, gqa=True)[0]

    def __call__(self, q, k, v, *, causal: bool = True, doc_ids=None):
        gqa = q.shape[1] != k.shape[1]
        if gqa and not self.native_gqa(q.device, q.dtype, q.shape[-1]):
            k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
            gqa = False
        with sdpa_kernel([self.sdp_backend]):
            if doc_ids is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
            return _per_document(q, k, v, doc_ids, causal, gqa)


class Flash(SdpaBackend):
    name = "flash"
    description = "SDPA FlashAttention-2 (CUDA sm80+, fp16/bf16; CPU flash kernel on CPU)"
    sdp_backend = SDPBackend.FLASH_ATTENTION
    priority = 30
    cuda_only = False

    def why_unavailable(self) -> str | None:
        if probes.cuda_available():
            if not probes.flash_built():
                return "this torch build has no flash attention (upgrade to a wheel built with it)"
            major, minor = probes.gpu_capability()
            if major < 8 and not probes.sdpa_cpu_flash_supported():
                return f"flash attention needs compute capability 8.0+, this GPU is {major}.{minor}"
            return None
        if not probes.sdpa_cpu_flash_supported():
            return "this torch build has no CPU flash attention kernel"
        return None


class Efficient(SdpaBackend):
    name = "efficient"
    description = "SDPA memory-efficient attention (xFormers-style, CUDA)"
    sdp_backend = SDPBackend.EFFICIENT_ATTENTION
    priority = 20


class Cudnn(SdpaBackend):
    name = "cudnn"
    description = "SDPA cuDNN attention (CUDA, cuDNN 9+)"
    sdp_backend = SDPBackend.CUDNN_ATTENTION
    priority = 25

    def why_unavailable(self) -> str | None:
        reason = super().why_unavailable()
        if reason:
            return reason
        if probes.cudnn_version() is None:
            return "this torch build has no cuDNN"
        return None

    def priority_for(self, request: AttentionRequest) -> int:
        # cuDNN's fused attention is the fastest SDPA kernel on Hopper.
        cap = probes.gpu_capability()
        return 35 if cap and cap[0] >= 9 else self.priority


class Math(SdpaBackend):
    name = "math"
    description = "SDPA reference math kernel (slow, materialises T x T scores)"
    sdp_backend = SDPBackend.MATH
    priority = 0
    cuda_only = False


def _repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, h_kv, t, d = x.shape
    return x[:, :, None].expand(b, h_kv, n_heads // h_kv, t, d).reshape(b, n_heads, t, d)


def _per_document(q, k, v, doc_ids, causal, gqa):
    rows = []
    for b, lengths in enumerate(document_lengths(doc_ids)):
        parts = []
        start = 0
        for length in lengths:
            sl = slice(start, start + length)
            parts.append(
                F.scaled_dot_product_attention(
                    q[b : b + 1, :, sl], k[b : b + 1, :, sl], v[b : b + 1, :, sl], is_causal=causal, enable_gqa=gqa
                )
            )
            start += length
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0)


_lengths_cache: tuple[torch.Tensor, list[list[int]]] | None = None


def document_lengths(doc_ids: torch.Tensor) -> list[list[int]]:
    """Lengths of the runs of equal ids in each row; cached for the layers of one forward."""
    global _lengths_cache
    if _lengths_cache is not None and _lengths_cache[0] is doc_ids:
        return _lengths_cache[1]
    lengths = [torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in doc_ids]
    _lengths_cache = (doc_ids, lengths)
    return lengths


@functools.cache
def _probe(backend: SDPBackend, device_type: str, dtype: torch.dtype, head_dim: int, gqa: bool):
    """Run a tiny causal forward+backward in this backend alone; (ok, reason, warnings)."""
    h_kv = 1 if gqa else 2
    q = torch.randn(1, 2, 16, head_dim, device=device_type, dtype=dtype, requires_grad=True)
    k = torch.randn(1, h_kv, 16, head_dim, device=device_type, dtype=dtype, requires_grad=True)
    v = torch.randn(1, h_kv, 16, head_dim, device=device_type, dtype=dtype, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught, sdpa_kernel([backend]):
        warnings.simplefilter("always")
        try:
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).sum().backward()
        except RuntimeError as exc:
            hints = [str(w.message).split("\n")[0] for w in caught]
            why = hints[0] if hints else str(exc).split("\n")[0]
            dtype_name = _DTYPE_NAMES.get(dtype, str(dtype))
            return False, f"PyTorch refuses {dtype_name}, head dim {head_dim} on {device_type}: {why}", ()
    return True, "", tuple(str(w.message) for w in caught)


flash, efficient, cudnn, math = Flash(), Efficient(), Cudnn(), Math()
