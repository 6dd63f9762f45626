"""The fused-op Triton kernels compiled for a CUDA GPU: bf16 / fp16 at W1's sizes.

Each form's output and gradients are compared with the float64 reference: the error may
be at most twice that of PyTorch's form in the same dtype, plus a floor of a few roundings
relative to the largest value. No timings are asserted here (`sftplug bench ops` times them).
"""

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (the CPU tests run the kernels in the interpreter)", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1: these tests need compiled kernels", allow_module_level=True)
pytest.importorskip("triton")

from sftplug.diagnostics.ops_bench import ops_request  # noqa: E402
from sftplug.fused import OPS, pytorch  # noqa: E402
from sftplug.fused.timing import case_for, outputs  # noqa: E402
from sftplug.plugins.triton_ops import triton_ops  # noqa: E402

_WHY = triton_ops.why_unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"triton-ops unavailable: {_WHY}")
FLOOR = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
FORMS = {form.op: form for form in triton_ops.forms}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("trains_norms", [False, True], ids=["lora", "full"])
def test_matches_the_float64_reference_at_w1_sizes(op, dtype, trains_norms):
    if trains_norms and op != "rmsnorm":
        pytest.skip("only RMSNorm differs between LoRA and full fine-tuning")
    request = dataclasses.replace(ops_request(torch.device("cuda"), dtype, "W1"), tokens=4096,
                                  trains_norms=trains_norms)
    case = case_for(op, request)
    form = FORMS[op]
    assert form.check(request) is None
    got = outputs(form, *case.make())
    ref = outputs(form.reference(), *case.make(float64=True))
    same = outputs(getattr(pytorch, op), *case.make())
    for i, (a, r, s) in enumerate(zip(got, ref, same)):
        assert a.shape == r.shape and torch.isfinite(a).all(), i
        err = (a.double() - r).abs().max().item()
        base = (s.double() - r).abs().max().item()
        floor = FLOOR[dtype] * max(1.0, r.abs().max().item())
        assert err <= 2 * base + floor, f"{op} result {i}: error {err:.3g} > 2 x torch's {base:.3g} + {floor:.3g}"


def test_auto_measures_before_it_takes_a_form():
    request = ops_request(torch.device("cuda"), torch.bfloat16, "W1")
    for form in triton_ops.forms:
        priority, why = form.priority_for(request)
        assert ("x PyTorch's speed here at" in why) and (priority > 0) == (float(why.split("x")[0]) >= 1.05), why
