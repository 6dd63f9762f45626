"""Built-in `flex` attention: PyTorch's FlexAttention (torch.nn.attention.flex_attention).

One BlockMask holds the causal mask, the packed documents (``doc_ids``) and the sliding
window, so blocks that no query of a block may see are skipped and the rest are masked
per score; soft-capped scores are a ``score_mod`` (``softcap * tanh(s / softcap)``), and the
softmax scale and GQA are flex_attention's own ``scale=`` and ``enable_gqa=True``. Sinks
(gpt-oss: exp(s_h) joins each row's denominator) scale the output by sigmoid(lse - s_h),
exact since softmax's sum is exp(lse): flex returns the log-sum-exp, and its backward takes
the gradient of lse (into its rowsum(dO * O) term), so q, k and the sinks all get theirs. The
mask is built once per ``doc_ids`` batch (every layer of a forward passes the same tensor)
and once per length and window for rows of one document.

Where it runs: on CUDA GPUs, compiled (``torch.compile(flex_attention)`` generates Triton
kernels for these masks; eager flex_attention is an unfused reference that materializes
the scores). PyTorch's CPU FlexAttention is inference-only (its backward raises), so the
plugin is not offered for training on the CPU. Before it is offered on a GPU for a window,
a soft-cap or by name, one tiny compiled forward and backward is checked against plain
PyTorch there (once per dtype, head dim and options).

auto: first on a GPU for requests with a sliding window or soft-capped scores, which
flash and cuDNN cannot run and efficient and math run only with a dense band mask (every
masked score still computed); elsewhere below every SDPA kernel but math (not measured
against them).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from sftplug import hookimpl, probes
from sftplug.attention import AttentionBackend, AttentionRequest, Priority
from sftplug.dtypes import dtype_name
from sftplug.kernels.packed_documents import one_document_per_row

PRIORITY_WITH_OPTIONS = 45  # above every other GPU backend: the fused choice for windows and soft-caps
PRIORITY = 12  # plain requests: below flash, cuDNN, efficient and triton, above math
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def flex_module():
    """torch.nn.attention.flex_attention, or None when this torch has none."""
    try:
        from torch.nn.attention import flex_attention
    except ImportError:
        return None
    return flex_attention


class Flex(AttentionBackend):
    name = "flex"
    description = "PyTorch FlexAttention, compiled (CUDA): causal, documents and sliding window in one block mask"
    priority = PRIORITY
    host_doc_ids = True  # one document per row is told on the host; the mask's copy moves once per batch
    sliding_window = softcap = custom_scale = sinks = True  # block mask, score_mod, scale=, the returned lse

    def why_unavailable(self) -> str | None:
        if flex_module() is None:
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (PyTorch 2.5+)"
        if not probes.cuda_available():
            return f"{_why_unavailable_on_cpu()}; {probes.why_no_gpu()}"
        return _why_unavailable_on_cuda()

    @hookimpl
    def select_attention(self, request: AttentionRequest):
        return self

    def priority_for(self, request: AttentionRequest) -> Priority:
        if request.device.type == "cuda" and (request.window or request.softcap):
            return Priority(PRIORITY_WITH_OPTIONS)
        return Priority(self.priority)

    def check(self, request: AttentionRequest) -> str | None:
        if request.device.type != "cuda":
            if request.device.type == "cpu":
                return _why_unavailable_on_cpu()
            return f"flex attention runs on CUDA GPUs, not {request.device.type}"
        if not probes.cuda_available():
            return probes.why_no_gpu()
        why_unavailable = _why_unavailable_on_cuda()
        if why_unavailable:
            return why_unavailable
        if request.dtype not in _DTYPES:
            return f"flex attention computes in fp16, bf16 or fp32, not {dtype_name(request.dtype)}"
        if request.head_dim < 16:
            return f"flex attention needs a head dim of at least 16, not {request.head_dim}"
        if request.window or request.softcap or request.sinks or request.name == self.name:
            # compiling costs seconds: only where flex would run (auto picks it for these, or by name)
            return first_run(str(request.device), request.dtype, request.head_dim, request.window > 0,
                             request.softcap > 0, request.sinks)
        return None

    def gqa_mode(self, device, dtype, head_dim) -> str:
        return "native"  # enable_gqa=True: K/V keep their own heads

    def __call__(self, q, k, v, *, causal: bool = True, doc_ids=None, window: int = 0, softcap: float = 0.0,
                 scale: float | None = None, sinks=None):
        # q: [B, Hq, T, D]; k, v: [B, Hkv, T, D]; doc_ids: [B, T] (host) or None; sinks: [Hq] or None
        if window and not causal:
            raise ValueError("a sliding window is causal (keys i - window < j <= i): pass causal=True")
        # eager flex_attention (CPU) is PyTorch's unfused reference path
        run = _compiled_flex() if q.device.type == "cuda" else flex_module().flex_attention
        options = dict(score_mod=soft_capped(float(softcap), q.device) if softcap else None,
                       block_mask=block_mask(doc_ids, q.shape[2], causal, window, q.device), scale=scale,
                       enable_gqa=q.shape[1] != k.shape[1])
        if sinks is None:
            return run(q, k, v, **options)
        return with_sinks(*_with_lse(run, q, k, v, **options), sinks)


def _with_lse(run, q, k, v, **options):
    """flex_attention's output and log-sum-exp [B, Hq, T] (natural log, fp32)."""
    api = flex_module()
    if hasattr(api, "AuxRequest"):
        out, aux = run(q, k, v, return_aux=api.AuxRequest(lse=True), **options)
        return out, aux.lse
    return run(q, k, v, return_lse=True, **options)  # torch < 2.9


def with_sinks(out, lse, sinks):
    """Attention whose denominators also hold exp(s_h): out * sum / (sum + exp(s_h)), with sum = exp(lse).

    A row that sees no key (lse = -inf) gives 0.
    """
    kept = torch.sigmoid(lse - sinks.float()[None, :, None])  # [B, Hq, T]
    return out * kept[..., None].to(out.dtype)


def _why_unavailable_on_cpu() -> str:
    return (f"flex attention trains on CUDA GPUs only: PyTorch's CPU FlexAttention has no backward "
            f"(torch {torch.__version__}, inference only)")


def _why_unavailable_on_cuda() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "flex attention is compiled to Triton kernels, and Triton is not installed"
    cap = probes.gpu_capability() or (0, 0)
    if probes.hip_version() is None and cap < (8, 0):
        return f"flex attention is offered on compute capability 8.0+; {probes.gpu_name()} is {cap[0]}.{cap[1]}"
    return None


@functools.cache
def _compiled_flex():
    return torch.compile(flex_module().flex_attention)


@functools.cache
def soft_capped(cap: float, device: torch.device):
    """The score_mod for soft-capped scores, one per cap and device.

    The cap is a captured 0-dim tensor, not a Python float: a float that changes between
    calls (the probe's, then the model's) turns into a symbolic float that FlexAttention's
    compiled path fails on (torch 2.13); a tensor is data, so the compiled code is reused.
    """
    cap_t = torch.tensor(cap, dtype=torch.float32, device=device)

    def soft_cap(score, b, h, q_idx, kv_idx):
        return cap_t * torch.tanh(score / cap_t)

    return soft_cap


_last_documents_mask: tuple | None = None  # (doc_ids, causal, window, device, BlockMask): the batch's, for every layer
_row_masks: dict[tuple, object] = {}  # (T, causal, window, device) -> BlockMask, rows of one document


def block_mask(doc_ids, t: int, causal: bool, window: int, device):
    """The BlockMask of causal, window and (doc_ids [B, T]) document masks; None when every key is visible."""
    global _last_documents_mask
    device = torch.device(device)
    if doc_ids is not None and one_document_per_row(doc_ids):
        doc_ids = None  # one document per row: the document mask hides nothing
    if doc_ids is None:
        key = (t, causal, window, device)
        if key not in _row_masks:
            _row_masks[key] = _build(None, t, causal, window, device)
        return _row_masks[key]
    cached = _last_documents_mask
    if cached is not None and cached[0] is doc_ids and cached[1:4] == (causal, window, device):
        return cached[4]
    mask = _build(doc_ids, t, causal, window, device)
    _last_documents_mask = (doc_ids, causal, window, device, mask)
    return mask


def _build(doc_ids, t: int, causal: bool, window: int, device):
    api = flex_module()
    mods = []
    if causal:
        mods.append(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx)
    if window:
        mods.append(lambda b, h, q_idx, kv_idx: kv_idx > q_idx - window)
    if doc_ids is not None:
        docs = doc_ids.to(device)

        mods.append(lambda b, h, q_idx, kv_idx: docs[b, q_idx] == docs[b, kv_idx])
    if not mods:
        return None
    batch = None if doc_ids is None else doc_ids.shape[0]
    return api.create_block_mask(api.and_masks(*mods), batch, None, t, t, device=device,
                                 _compile=device.type == "cuda")


def flex_reference(q, k, v, causal: bool, doc_ids=None, window: int = 0, softcap: float = 0.0, scale=None,
                   sinks=None):
    """Plain-PyTorch attention with the same options (explicit [B, 1, T, T] mask), in q's dtype."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    t = q.shape[2]
    i, j = torch.arange(t, device=q.device)[:, None], torch.arange(t, device=q.device)[None, :]
    allowed = torch.ones(t, t, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= j <= i
    if window:
        allowed &= j > i - window
    allowed = allowed[None, None]
    if doc_ids is not None:
        docs = doc_ids.to(q.device)
        allowed = allowed & (docs[:, None, :, None] == docs[:, None, None, :])
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is None:
        return torch.softmax(scores, -1) @ v
    sink = sinks.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:3], 1)
    return torch.cat([scores, sink], -1).softmax(-1)[..., :-1] @ v


@functools.cache
def first_run(device: str, dtype: torch.dtype, head_dim: int, window: bool, softcap: bool,
              sinks: bool = False) -> str | None:
    """None when one tiny compiled forward and backward matches plain PyTorch on ``device`` (the gradient of
    the sinks too, when asked), else why not."""
    what = f"{dtype_name(dtype)}, head dim {head_dim}{', sinks' if sinks else ''}"
    try:
        gen = torch.Generator().manual_seed(0)
        t = 200  # not a multiple of the 128 block: partial blocks masked per score
        make = lambda h: (torch.randn(1, h, t, head_dim, generator=gen) * 2).to(device, dtype)  # noqa: E731
        q, k, v, grad = make(4), make(2), make(2), make(4)
        doc_ids = torch.cat([torch.zeros(70, dtype=torch.long), torch.ones(t - 70, dtype=torch.long)])[None]
        options = {"window": 48 if window else 0, "softcap": 20.0 if softcap else 0.0, "scale": 0.2}
        tensors = (q, k, v, (torch.randn(4, generator=gen) * 4).to(device, dtype)) if sinks else (q, k, v)
        grads = []
        for fn, cast in ((flex, dtype), (flex_reference, torch.float32)):
            inputs = [x.detach().to(cast).requires_grad_() for x in tensors]
            out = fn(*inputs[:3], causal=True, doc_ids=doc_ids, **options, **({"sinks": inputs[3]} if sinks else {}))
            grads.append([out, *torch.autograd.grad(out, inputs, grad.to(cast))])
        tolerance = 1e-2 if dtype == torch.float32 else 6e-2  # fp32 may multiply in TF32
        for name, got, want in zip(("out", "dq", "dk", "dv", "dsinks"), *grads):
            err = (got.float() - want).abs().max().item()
            if not err <= tolerance * max(want.abs().max().item(), 1.0):
                return f"flex attention's first run on {device} ({what}) differs from PyTorch: {name} off by {err:.2g}"
    except Exception as exc:  # a compile or launch failure: why unavailable, not a crash
        first_line = (str(exc).splitlines() or [""])[0]
        return f"flex attention's first run on {device} ({what}) failed: {type(exc).__name__}: {first_line}"
    return None


flex = Flex()
