"""PyTorch SDPA attention backends: flash, efficient (memory-efficient), cudnn, math.

Each plugin probes before it registers (is the kernel in this wheel, is there a GPU it
runs on, does a tiny forward+backward run in it alone) and checks every request
(dtype, head dim) the same way, so "flash needs fp16/bf16" is said before a run starts.

Every call runs inside ``sdpa_kernel([its kernel])``: PyTorch cannot fall back to
another kernel silently, and neither global ``enable_*_sdp`` flags nor shell variables
such as ``PYTORCH_SDP_KERNEL`` change what runs. If the kernel refuses the inputs the
call raises, naming the kernel and saying why in PyTorch's words.

GQA: K/V are passed with their own head count (``enable_gqa=True``) where the kernel
takes that natively (probed); otherwise they are repeated, and ``sftplug doctor`` says so.

Packed rows (``doc_ids``): documents are gathered into batches of equal (causal: padded)
length and each batch is one SDPA call with ``is_causal`` (sftplug.kernels.packed_documents):
no T x T mask is ever built and the output is exactly the per-document attention.

Options: every kernel takes SDPA's ``scale=`` (``custom_scale``). A sliding window needs a
mask, and only efficient and math take an arbitrary one (flash and cuDNN take none): they
get a boolean band mask (causal and within the window), [T, T] for a row of one document,
[L, L] per bucket of packed documents (bucket positions are document positions), built
once per length and window and broadcast over batch and heads, so the extra memory is
T x T booleans (and the kernel's additive copy of them). No SDPA kernel can soft-cap
scores (no score hook) or add a sink (gpt-oss: a logit in the softmax's denominator only;
SDPA returns no log-sum-exp to rescale by, and a dense extra key column would be a T x (T + 1)
float mask): the contract makes them unavailable for it, saying why.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sftplug import hookimpl, probes
from sftplug.attention import AttentionBackend, AttentionRequest, Priority
from sftplug.dtypes import dtype_name
from sftplug.errors import SftplugError
from sftplug.kernels.packed_documents import pack_plan

# auto's order, fastest first, by device generation: causal fwd+bwd at the attention
# benchmark's shapes (BENCHMARKS.md; on Hopper cuDNN's kernel is reported well ahead of
# FlashAttention-2; PyTorch's own default order on Ampere/Ada). `sftplug bench attention`
# measures it on the GPU at hand. The Triton plugin's 28 (40 for packed rows) sits between
# these.
PRIORITIES = {
    "cpu": {"flash": 30, "math": 0},
    "sm90+": {"cudnn": 35, "flash": 30, "efficient": 20, "math": 0},
    "sm80": {"flash": 30, "cudnn": 25, "efficient": 20, "math": 0},
    "older": {"efficient": 20, "flash": 15, "cudnn": 10, "math": 0},
}

_HALF = (torch.float16, torch.bfloat16)


def gpu_generation(device: torch.device) -> str:
    """The key of :data:`PRIORITIES` for a device."""
    if device.type != "cuda":
        return "cpu"
    cap = probes.gpu_capability() or (0, 0)
    if cap >= (9, 0):
        return "sm90+"
    return "sm80" if cap >= (8, 0) else "older"


class SdpaBackend(AttentionBackend):
    """One SDPA kernel, run alone. Subclasses set ``name`` and ``cuda_only``."""

    cuda_only = True
    packed_documents = True  # bucketed per-document calls, see the module docstring
    host_doc_ids = True  # the plan is built from the host copy: no GPU sync
    custom_scale = True  # SDPA's scale= argument, taken by every kernel
    sliding_window = False  # flash and cuDNN take no mask; efficient and math set it (band masks)

    @property
    def sdp_backend(self) -> SDPBackend:
        return probes.sdpa_backends()[self.name]

    # -- availability and checks ---------------------------------------------------
    def why_unavailable(self) -> str | None:
        """Machine-level: judged for the GPU when there is one, else for the CPU."""
        if not probes.cuda_available():
            if self.cuda_only:
                return f"{self.name} attention runs only on CUDA GPUs; {probes.why_no_gpu()}"
            return self._why_no_dtype_runs("cpu")
        return self.why_unavailable_on_cuda(None) or self._why_no_dtype_runs("cuda")

    def _why_no_dtype_runs(self, device_type: str) -> str | None:
        """None if some training dtype runs here, else why the preferred one does not."""
        dtypes = (torch.float32,) if device_type == "cpu" else (torch.bfloat16, torch.float16, torch.float32)
        answers = []
        for dtype in dtypes:
            request = AttentionRequest(self.name, torch.device(device_type), dtype, 64, 2, 2)
            why_unavailable = self.check(request)
            if why_unavailable is None:
                return None
            answers.append(why_unavailable)
        return answers[0]

    def why_unavailable_on_cuda(self, request: AttentionRequest | None) -> str | None:
        """Known CUDA limits, worded for people; PyTorch's probe has the last word."""
        return None

    @hookimpl
    def select_attention(self, request: AttentionRequest):
        return self

    def priority_for(self, request: AttentionRequest) -> Priority:
        return Priority(PRIORITIES[gpu_generation(request.device)].get(self.name, self.priority))

    def check(self, request: AttentionRequest) -> str | None:
        device = request.device.type
        if device not in ("cpu", "cuda"):
            return f"{self.name} attention runs on CUDA GPUs or the CPU, not {device}"
        if device == "cpu" and self.cuda_only:
            return f"{self.name} attention runs only on CUDA GPUs, not the CPU"
        if device == "cuda":
            if not probes.cuda_available():
                return probes.why_no_gpu()
            why_unavailable = self.why_unavailable_on_cuda(request)
            if why_unavailable:
                return why_unavailable
        why_unavailable = probes.sdpa_why_unavailable(self.name, device, request.dtype, request.head_dim)
        if why_unavailable:
            what = f"{dtype_name(request.dtype)}, head dim {request.head_dim} on {device}"
            return f"PyTorch's {self.name} kernel refuses {what}: {why_unavailable}"
        if request.n_heads != request.n_kv_heads:
            self.gqa_mode(request.device, request.dtype, request.head_dim)  # probe now, not mid-step
        return None

    def gqa_mode(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
        """'native': K/V keep their own heads; 'repeat': K/V heads are copied per query group."""
        if self.name == "math":
            return "repeat"  # PyTorch's math kernel expands K/V itself
        # the probe's answer is cached: asked first by check(), before any training step
        ok = probes.sdpa_why_unavailable(self.name, device.type, dtype, head_dim, gqa=True) is None
        return "native" if ok else "repeat"

    # -- the call ------------------------------------------------------------------
    def __call__(self, q, k, v, *, causal: bool = True, doc_ids=None, window: int = 0, scale: float | None = None):
        # q: [B, Hq, T, D]; k, v: [B, Hkv, T, D]; doc_ids: [B, T] or None
        if window and not self.sliding_window:
            raise SftplugError(f"{self.name} attention cannot apply a sliding window (the kernel takes no mask)")
        if window and not causal:
            raise ValueError("a sliding window is causal (keys i - window < j <= i): pass causal=True")
        kv_shape = tuple(k.shape)
        gqa = q.shape[1] != k.shape[1]
        if gqa and self.name != "math" and self.gqa_mode(q.device, q.dtype, q.shape[-1]) == "repeat":
            k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
            gqa = False
        try:
            with sdpa_kernel([self.sdp_backend]):
                plan = None if doc_ids is None else pack_plan(doc_ids, causal, q.device)
                if plan is None:
                    mask = band_mask(q.shape[2], window, q.device) if window else None
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and not window,
                                                          scale=scale, enable_gqa=gqa)
                mask_of = (lambda n: band_mask(n, window, q.device)) if window else None
                return plan.attend(q, k, v, causal, gqa, scale=scale, mask_of=mask_of)
        except RuntimeError as exc:
            if not _no_kernel(exc):
                raise
            raise SftplugError(self.cannot_run_message(q, k, kv_shape, causal, gqa, exc)) from None

    def cannot_run_message(self, q, k, kv_shape, causal: bool, gqa: bool, exc: BaseException) -> str:
        """One line: this kernel, the inputs, why PyTorch cannot run them, and that nothing fell back."""
        request = AttentionRequest(self.name, q.device, q.dtype, q.shape[-1], q.shape[1], kv_shape[1])
        why_unavailable = self.check(request)
        if why_unavailable is None:
            why_lines = probes.sdpa_can_use(self.name, q, k, k, causal=causal, gqa=gqa)[1]
            why_unavailable = "; ".join(why_lines) or str(exc).strip().split("\n")[0]
        return (
            f"{self.name} attention cannot run q {tuple(q.shape)}, k/v {kv_shape} "
            f"{dtype_name(q.dtype)} on {q.device}: {why_unavailable} "
            "(sftplug never falls back to another kernel; choose one with --attention, see `sftplug doctor`)"
        )


def _no_kernel(exc: RuntimeError) -> bool:
    text = str(exc)
    return "No available kernel" in text or "No viable backend" in text


class Flash(SdpaBackend):
    name = "flash"
    description = "SDPA FlashAttention-2 (CUDA sm80+, fp16/bf16; PyTorch's flash kernel on the CPU)"
    priority = 30
    cuda_only = False

    def why_unavailable_on_cuda(self, request):
        if not probes.flash_built():
            return f"this torch build has no flash attention (torch {torch.__version__}, CUDA {probes.cuda_version()})"
        cap = probes.gpu_capability()
        if probes.hip_version() is None and cap < (8, 0):
            return f"flash needs compute capability 8.0+ (Ampere or newer); {probes.gpu_name()} is {cap[0]}.{cap[1]}"
        if request is None:
            return None
        if request.dtype not in _HALF:
            dtype = dtype_name(request.dtype)
            return f"flash needs fp16/bf16, not {dtype} (use --dtype bf16, or efficient for fp32)"
        if request.head_dim % 8 or request.head_dim > 256:
            return f"flash needs a head dim that is a multiple of 8 and at most 256, not {request.head_dim}"
        return None


class Efficient(SdpaBackend):
    name = "efficient"
    description = "SDPA memory-efficient attention (CUDA; fp32, fp16, bf16)"
    priority = 20
    sliding_window = True  # as a band mask (attn_mask)

    def why_unavailable_on_cuda(self, request):
        if request is None:
            return None
        if request.dtype not in (*_HALF, torch.float32):
            return f"efficient needs fp16, bf16 or fp32, not {dtype_name(request.dtype)}"
        cap = probes.gpu_capability()
        if request.dtype == torch.bfloat16 and cap < (8, 0) and probes.hip_version() is None:
            return f"efficient needs compute capability 8.0+ for bf16; {probes.gpu_name()} is {cap[0]}.{cap[1]}"
        return None


class Cudnn(SdpaBackend):
    name = "cudnn"
    description = "SDPA cuDNN fused attention (CUDA sm80+, cuDNN 9+, fp16/bf16)"
    priority = 25

    def priority_for(self, request: AttentionRequest) -> Priority:
        # Ahead of flash on Hopper only where it gave flash's gradients here (cuDNN SM90
        # backward bugs are reported for some lengths), and never for packed rows: their
        # per-document calls have many short odd lengths.
        priority = super().priority_for(request)
        if priority.value <= PRIORITIES["sm90+"]["flash"] or request.dtype not in _HALF:
            return priority
        if request.packed or probes.sdpa_parity("cudnn", "flash", request.dtype, request.head_dim) is not None:
            return Priority(PRIORITIES["sm80"]["cudnn"])  # below flash
        return priority

    def why_unavailable_on_cuda(self, request):
        version = probes.cudnn_version()
        if version is None:
            return "this torch build has no cuDNN"
        if version < 90000:
            return f"cudnn attention needs cuDNN 9+, this build has {probes.cudnn_version_text()}"
        cap = probes.gpu_capability()
        if cap < (8, 0):
            return f"cudnn attention needs compute capability 8.0+; {probes.gpu_name()} is {cap[0]}.{cap[1]}"
        if request is None:
            return None
        if request.dtype not in _HALF:
            return f"cudnn needs fp16/bf16, not {dtype_name(request.dtype)}"
        return None


class Math(SdpaBackend):
    name = "math"
    # the one -ise spelling left: `sftplug doctor --json` prints this text, and scripts compare it
    description = "SDPA reference math kernel (slow: materialises the scores of each document)"
    priority = 0
    cuda_only = False
    sliding_window = True  # as a band mask (attn_mask)


_BAND_MASKS: dict[tuple, torch.Tensor] = {}


def band_mask(n: int, window: int, device) -> torch.Tensor:
    """[n, n] boolean, True where query i may see key j: i - window < j <= i (cached: every layer asks)."""
    key = (n, window, str(device))
    if key not in _BAND_MASKS:
        i, j = torch.arange(n, device=device)[:, None], torch.arange(n, device=device)[None, :]
        _BAND_MASKS[key] = (j <= i) & (j > i - window)
    return _BAND_MASKS[key]


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, n_heads, T, D], each K/V head repeated for its query group."""
    b, h_kv, t, d = x.shape
    return x[:, :, None].expand(b, h_kv, n_heads // h_kv, t, d).reshape(b, n_heads, t, d)


flash, efficient, cudnn, math = Flash(), Efficient(), Cudnn(), Math()
