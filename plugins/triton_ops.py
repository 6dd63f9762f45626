"""Built-in `triton` fused ops: sftplug's Triton kernels for RMSNorm, the gated MLP, RoPE, the
loss's chunk step and the experts' linear layers (kernels/rms_norm.py, glu.py, rope.py,
cross_entropy.py, grouped_gemm.py).

Registers where the Triton kernels can run (kernels/runtime.py): a CUDA GPU of compute
capability 8.0+, or the CPU interpreter under TRITON_INTERPRET=1, for tests. Before a form
is offered for a request, it runs once at the request's sizes (a few rows) and is compared
with the float64 reference. On a GPU, ``auto`` takes a form only where it measures at least
:data:`FASTER` times PyTorch's speed at the run's sizes (forward and backward, once per
process); on the CPU never: the interpreter is for tests.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from sftplug import hookimpl
from sftplug.dtypes import dtype_name
from sftplug.fused import FusedOp, FusedOpsRequest, Priority, pytorch
from sftplug.fused.timing import case_for, outputs, time_op

FASTER = 1.05  # a measured speed-up below this is within the noise of a few repetitions


class TritonForm(FusedOp):
    name = "triton"

    def kernel(self):
        raise NotImplementedError

    def reference(self):
        raise NotImplementedError

    def __call__(self, *args):
        return self.kernel()(*args)

    def check(self, request: FusedOpsRequest) -> str | None:
        from sftplug import probes

        if request.device.type == "cuda":
            if request.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                return f"triton {self.op} computes fp32, fp16 and bf16, not {dtype_name(request.dtype)}"
        elif not probes.triton_interpreter():
            return f"triton {self.op} runs on CUDA GPUs, not {request.device.type}"
        elif request.dtype == torch.bfloat16:
            return "the Triton interpreter computes bf16 wrongly; use fp32 or fp16 on the CPU"
        return first_run(self, dataclasses.replace(request, tokens=min(request.tokens, 8)))

    def priority_for(self, request: FusedOpsRequest) -> Priority:
        if request.device.type != "cuda":
            return Priority(-10, "the CPU interpreter is for tests")
        speedup = measured_speedup(self, request)
        shape = case_for(self.op, request).shape
        if speedup >= FASTER:
            return Priority(20, f"{speedup:.2f}x PyTorch's speed here at {shape}")
        return Priority(-1, f"{speedup:.2f}x PyTorch's speed here at {shape}")


class RMSNorm(TritonForm):
    op = "rmsnorm"
    description = "RMSNorm forward and backward in one pass each (Llama and Gemma forms)"

    def kernel(self):
        from sftplug.kernels.rms_norm import rms_norm

        return rms_norm

    def reference(self):
        from sftplug.kernels.rms_norm import rms_norm_reference

        return rms_norm_reference


class GLU(TritonForm):
    op = "glu"
    description = "SwiGLU / GeGLU without keeping the activation for the backward"

    def check(self, request: FusedOpsRequest) -> str | None:
        if request.activation not in pytorch.ACTIVATIONS:
            return f"triton glu computes {', '.join(pytorch.ACTIVATIONS)}, not {request.activation}"
        return super().check(request)

    def kernel(self):
        from sftplug.kernels.glu import glu

        return glu

    def reference(self):
        from sftplug.kernels.glu import glu_reference

        return glu_reference


class Rope(TritonForm):
    op = "rope"
    description = "RoPE in place on q and k at once, partial rotary"

    def kernel(self):
        from sftplug.kernels.rope import rope

        return rope

    def reference(self):
        from sftplug.kernels.rope import rope_reference

        return rope_reference


class CrossEntropy(TritonForm):
    op = "cross_entropy"
    description = "softmax, loss and logit gradient in one pass over each row of a chunk"

    def __call__(self, logits, targets):
        from sftplug.kernels.cross_entropy import cross_entropy_

        return cross_entropy_(logits, targets).sum(), logits  # the gradient overwrote the logits

    def kernel(self):
        return self.__call__

    def reference(self):
        from sftplug.kernels.cross_entropy import cross_entropy_reference

        return lambda logits, targets: _summed(cross_entropy_reference(logits, targets))


class GroupedLinear(TritonForm):
    op = "grouped_linear"
    description = "the experts' linear layers as one grouped GEMM, the LoRA inside it"

    def check(self, request: FusedOpsRequest) -> str | None:
        if not request.experts:
            return "triton grouped_linear computes a mixture of experts; this model has none"
        return super().check(request)

    def __call__(self, x, groups, weight, bias=None, lora=None):
        from sftplug.kernels.grouped_gemm import grouped_linear

        return grouped_linear(x, groups.ends, weight, bias, lora)

    def kernel(self):
        return self.__call__

    def reference(self):
        from sftplug.fused.grouped import grouped_linear

        return grouped_linear


def _summed(losses_and_grad):
    losses, grad = losses_and_grad
    return losses.sum(), grad


@functools.cache
def first_run(form: TritonForm, request: FusedOpsRequest) -> str | None:
    """None when the form matches its float64 reference on a few rows of the request, else what went wrong."""
    what = f"{dtype_name(request.dtype)} on {request.device}"
    case = case_for(form.op, request)
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(request.device.type, enabled=False):
        try:
            got = outputs(form, *case.make())
        except Exception as exc:  # compilation, launch or a driver error: why unavailable, not a crash
            return f"triton {form.op} failed its first run for {what}: {type(exc).__name__}: {exc}"
        ref = outputs(form.reference(), *case.make(float64=True))
    tolerance = max(8 * torch.finfo(request.dtype).eps, 1e-4)  # a few roundings pass; a broken kernel is off by O(1)
    for i, (a, r) in enumerate(zip(got, ref)):
        error = float((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-30))
        if not error <= tolerance:
            return (f"triton {form.op}'s first run for {what} is wrong: result {i} off by {error:.1e} "
                    f"(> {tolerance:.0e})")
    return None


@functools.cache
def measured_speedup(form: TritonForm, request: FusedOpsRequest) -> float:
    """PyTorch's time over this form's, forward and backward, at the request's sizes."""
    case = case_for(form.op, request)
    reference = getattr(pytorch, form.op)
    ours, theirs = (sum(t or 0.0 for t in time_op(f, case)) for f in (form, reference))
    return theirs / ours if ours > 0 else 0.0


class TritonOps:
    """The plugin: the five forms, offered where the kernels can run."""

    forms = (RMSNorm(), GLU(), Rope(), CrossEntropy(), GroupedLinear())

    def why_unavailable(self) -> str | None:
        from sftplug.kernels.runtime import triton_available

        ok, why = triton_available()
        return None if ok else why

    @hookimpl
    def select_fused_ops(self, request: FusedOpsRequest):
        return list(self.forms)


triton_ops = TritonOps()
