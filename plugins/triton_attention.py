"""Built-in `triton` attention: sftplug's own fused kernel (kernels/attention.py).

Registers where Triton imports and a CUDA GPU of compute capability 8.0+ drives it, or
under TRITON_INTERPRET=1 (the CPU interpreter, used by tests). Before it is offered for
a dtype and head dim, it compiles and runs one tiny forward and backward there and
compares them with the plain-PyTorch reference (once per process), so ``auto`` never
picks a kernel that has not worked once on this machine (with a sliding window,
soft-capping and attention sinks when the request has them). Packed rows run natively: blocks of other
documents are skipped, so it is the first choice for packed data; so are key blocks
behind a sliding window.
"""

from __future__ import annotations

import functools

import torch

from sftplug import hookimpl
from sftplug.attention import AttentionBackend, AttentionRequest, Priority
from sftplug.dtypes import dtype_name
from sftplug.kernels.attention import HEAD_DIMS  # importing never fails, Triton or not


class Triton(AttentionBackend):
    name = "triton"
    description = ("sftplug's Triton FlashAttention-2 kernel (GQA, packed documents, sliding windows, soft-capping, "
                   "sinks)")
    priority = 28
    sliding_window = True
    softcap = True
    custom_scale = True
    sinks = True

    def why_unavailable(self) -> str | None:
        from sftplug.kernels.attention import triton_attention_available

        ok, why = triton_attention_available()
        return None if ok else why

    @hookimpl
    def select_attention(self, request: AttentionRequest):
        return self

    def priority_for(self, request: AttentionRequest) -> Priority:
        from sftplug import probes

        if request.device.type != "cuda":
            return Priority(-10)  # the CPU interpreter is for tests: only when asked for by name
        if request.head_dim == 256 and (probes.gpu_capability() or (0, 0)) >= (9, 0):
            return Priority(10)  # its D=256 backward has no wgmma on Hopper (kernels/attention.py): flash there
        return Priority(40 if request.packed else self.priority)

    def check(self, request: AttentionRequest) -> str | None:
        from sftplug import probes

        if request.head_dim not in HEAD_DIMS:
            return f"triton attention supports head dims {HEAD_DIMS}, not {request.head_dim}"
        if request.device.type == "cuda":
            if request.dtype not in (torch.float16, torch.bfloat16):
                return "triton attention on the GPU needs fp16/bf16 (use --dtype bf16)"
        elif not probes.triton_interpreter():
            return f"triton attention runs on CUDA GPUs, not {request.device.type}"
        elif request.dtype == torch.bfloat16:
            return "the Triton interpreter computes bf16 wrongly; use fp32 or fp16 on the CPU"
        return first_run(str(request.device), request.dtype, request.head_dim, window=bool(request.window),
                         softcap=bool(request.softcap), sinks=request.sinks)

    def __call__(self, q, k, v, *, causal: bool = True, doc_ids=None, window: int = 0, softcap: float = 0.0,
                 scale: float | None = None, sinks=None):
        from sftplug.kernels.attention import triton_attention

        return triton_attention(q, k, v, causal=causal, doc_ids=doc_ids, window=window, softcap=softcap, scale=scale,
                                sinks=sinks)


# What the first run adds for a request with a window or soft-capping: a window shorter than its
# 24 tokens, and a cap low enough that tanh bends the scores (they are about N(0, 1) there).
_FIRST_RUN_WINDOW = 7
_FIRST_RUN_SOFTCAP = 1.5


@functools.cache
def first_run(device: str, dtype: torch.dtype, head_dim: int, window: bool = False,
              softcap: bool = False, sinks: bool = False) -> str | None:
    """None when one tiny causal GQA forward and backward match the reference here (with a sliding
    window, soft-capped scores and sinks if asked), else what went wrong."""
    from sftplug.kernels.attention import attention_reference, triton_attention

    options = {"causal": True}
    if window:
        options["window"] = _FIRST_RUN_WINDOW
    if softcap:
        options["softcap"] = _FIRST_RUN_SOFTCAP
    what = f"{dtype_name(dtype)}, head dim {head_dim}{', sliding window' if window else ''}" \
           f"{', soft-capped' if softcap else ''}{', sinks' if sinks else ''} on {device}"
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(shape, generator=gen) for shape in [(1, 4, 24, head_dim), (1, 2, 24, head_dim),
                                                                   (1, 2, 24, head_dim), (1, 4, 24, head_dim)])
    inputs = (q, k, v, torch.randn(4, generator=gen)) if sinks else (q, k, v)  # sinks about as large as the scores

    def attention(fn, *x):
        return fn(*x[:3], **options, **({"sinks": x[3]} if sinks else {}))

    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False):
        try:
            x = [t.to(device, dtype).requires_grad_() for t in inputs]
            out = attention(triton_attention, *x)
            grads = torch.autograd.grad(out, x, do.to(device, dtype), allow_unused=True)  # unused: wrong, not a crash
            got = [out, *(torch.zeros_like(t) if g is None else g for t, g in zip(x, grads))]
        except Exception as exc:  # compilation, launch or a driver error: why unavailable, not a crash
            return f"triton attention failed its first run for {what}: {type(exc).__name__}: {exc}"
        x = [t.double().requires_grad_() for t in inputs]
        ref_out = attention(attention_reference, *x)
        ref = [ref_out, *torch.autograd.grad(ref_out, x, do.double())]
    # relative to the largest value: a few roundings of the dtype pass, a broken kernel is off by O(1)
    tolerance = max(8 * torch.finfo(dtype).eps, 1e-4)
    for name, a, r in zip(("output", "dq", "dk", "dv", "dsinks"), got, ref):
        error = float((a.detach().double().cpu() - r.detach()).abs().max() / r.detach().abs().max())
        if not error <= tolerance:
            return f"triton attention's first run for {what} is wrong: {name} off by {error:.1e} (> {tolerance:.0e})"
    return None


triton = Triton()
