"""The Triton grouped GEMM (the experts' linear layers) on the CPU under the Triton interpreter,
and compiled for sm_80 and sm_90a.

The output and every gradient (x, weight, bias, the LoRA's A and B) are compared with the
PyTorch form (sftplug.fused.grouped.grouped_linear) in float64: the kernel's error may be at
most twice that of the PyTorch form in the same dtype, plus a few roundings of the dtype
relative to the largest value (conftest.py). The interpreter's tiles are 16 rows x 32
columns x 16 deep, so the sizes here span several tiles, partial ones included.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from sftplug.fused.grouped import Groups  # noqa: E402
from sftplug.fused.grouped import grouped_linear as pytorch_form  # noqa: E402
from sftplug.kernels.grouped_gemm import compile_specs, grouped_linear  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.interpreted
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])


def _triton_form(x, groups, weight, bias=None, lora=None):
    return grouped_linear(x, groups.ends, weight, bias, lora)


def _case(counts, k, n, rank=0, bias=False, transposed=False, seed=0):
    """float64 inputs: x, groups, weight (a transposed view of [E, K, N] storage if ``transposed``),
    bias, A, B, and the output's gradient."""
    g = torch.Generator().manual_seed(seed)
    n_experts, rows = len(counts), sum(counts)
    groups = Groups.of(torch.repeat_interleave(torch.arange(n_experts), torch.tensor(counts)), n_experts)

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    x = rand(rows, k)
    weight = rand(n_experts, k, n, scale=k ** -0.5).transpose(1, 2) if transposed else rand(n_experts, n, k,
                                                                                             scale=k ** -0.5)
    tensors = dict(x=x, weight=weight, bias=rand(n_experts, n) if bias else None,
                   a=rand(n_experts, rank, k, scale=k ** -0.5) if rank else None,
                   b=rand(n_experts, n, rank) if rank else None)
    return tensors, groups, rand(rows, n)


def _grads(form, tensors, groups, grad_out, dtype, trained, scale=0.5):
    """[output, *gradients of the ``trained`` inputs] of ``form`` on copies of ``tensors`` in ``dtype``
    (each keeps its strides: a transposed weight stays a transposed view)."""
    leaves = {name: t.detach().to(dtype).requires_grad_(name in trained) if t is not None else None
              for name, t in tensors.items()}
    lora = (leaves["a"], leaves["b"], scale) if leaves["a"] is not None else None
    out = form(leaves["x"], groups, leaves["weight"], leaves["bias"], lora)
    grads = torch.autograd.grad(out, [leaves[name] for name in trained], grad_out.to(out.dtype))
    return [out.detach(), *grads]


CASES = [
    # counts of rows per expert, K, N, LoRA rank, bias, transposed weight
    ([5, 11, 7], 48, 40, 0, False, False),  # odd counts, every tile partial
    ([0, 33, 1, 0, 17], 40, 64, 0, True, False),  # experts without rows (first, middle, last)
    ([9, 0, 24], 48, 40, 0, True, True),  # gpt-oss: a transposed view of [E, K, N] storage
    ([5, 11, 7], 48, 40, 3, False, False),  # LoRA of an odd rank
    ([0, 19, 0, 6], 40, 48, 16, True, True),  # LoRA, bias, transposed weight, empty experts
    ([13], 24, 16, 8, False, False),  # one expert: a plain linear layer
]


@interpreted
@DTYPES
@pytest.mark.parametrize("counts,k,n,rank,bias,transposed", CASES)
def test_matches_the_pytorch_form(counts, k, n, rank, bias, transposed, dtype, assert_close_to_float64):
    tensors, groups, grad_out = _case(counts, k, n, rank, bias, transposed, seed=sum(counts) + k)
    # full fine-tuning trains the weight and bias; a LoRA trains A and B (and x's gradient flows on)
    trained = ["x", "a", "b"] if rank else ["x", "weight"] + (["bias"] if bias else [])
    got = _grads(_triton_form, tensors, groups, grad_out, dtype, trained)
    ref64 = _grads(pytorch_form, tensors, groups, grad_out, torch.float64, trained)
    same = _grads(pytorch_form, tensors, groups, grad_out, dtype, trained)
    assert all(t.dtype == dtype for t in got)
    assert_close_to_float64(got, ref64, same, dtype, f"{counts} K={k} N={n} r={rank}", ["out", *trained])


@interpreted
def test_every_input_gets_its_gradient_at_once(assert_close_to_float64):
    # a LoRA on a weight that trains too: all five gradients from one backward
    tensors, groups, grad_out = _case([7, 0, 12], 32, 48, rank=4, bias=True, transposed=True, seed=3)
    trained = ["x", "weight", "bias", "a", "b"]
    got = _grads(_triton_form, tensors, groups, grad_out, torch.float32, trained)
    ref64 = _grads(pytorch_form, tensors, groups, grad_out, torch.float64, trained)
    same = _grads(pytorch_form, tensors, groups, grad_out, torch.float32, trained)
    assert_close_to_float64(got, ref64, same, torch.float32, "all inputs", ["out", *trained])


@interpreted
def test_an_expert_without_rows_gets_zero_gradients():
    tensors, groups, grad_out = _case([0, 9, 0], 32, 32, rank=2, bias=True, seed=5)
    _, _, dw, dbias, da, db = _grads(_triton_form, tensors, groups, grad_out, torch.float32,
                                     ["x", "weight", "bias", "a", "b"])
    for grad in (dw, dbias, da, db):
        assert grad[0].eq(0).all() and grad[2].eq(0).all() and grad[1].ne(0).any()


@interpreted
def test_the_weight_gradient_keeps_the_weights_layout():
    tensors, groups, grad_out = _case([4, 6], 32, 48, transposed=True, seed=7)
    _, dw = _grads(_triton_form, tensors, groups, grad_out, torch.float32, ["weight"])
    assert dw.stride() == tensors["weight"].stride()  # the [E, K, N] storage's gradient is [E, K, N] too


@interpreted
def test_no_rows():
    tensors, groups, grad_out = _case([0, 0], 16, 32, bias=True, seed=1)
    out, dx, dw, dbias = _grads(_triton_form, tensors, groups, grad_out, torch.float32, ["x", "weight", "bias"])
    assert out.shape == (0, 32) and dx.shape == (0, 16)
    assert dw.eq(0).all() and dbias.eq(0).all()


@interpreted
def test_refuses_what_does_not_fit():
    tensors, groups, _ = _case([3, 4], 16, 32, rank=2, seed=2)
    x, weight, a, b = (tensors[n].float() for n in ("x", "weight", "a", "b"))
    with pytest.raises(ValueError, match="do not fit"):
        grouped_linear(x[:, :8], groups.ends, weight)
    with pytest.raises(ValueError, match="ends must be int32"):
        grouped_linear(x, groups.ends.long(), weight)
    with pytest.raises(ValueError, match="the LoRA must be"):
        grouped_linear(x, groups.ends, weight, None, (a, b.transpose(1, 2), 1.0))
    with pytest.raises(ValueError, match="must be one of"):
        grouped_linear(x, groups.ends, weight.half())


@pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1: kernels are interpreted, not compiled")
@pytest.mark.parametrize("target", ["sm_80", "sm_90a"])
def test_compiles_without_spills_and_with_wgmma_on_hopper(target):
    from sftplug.kernels.compile_report import compile_spec, format_report

    specs = [s for s in compile_specs("bf16")
             if s["name"] in ("grouped_mm_k_lora", "grouped_wgrad_n") and s["targets"] == [target]]
    rows = [compile_spec(spec, target, "bf16") for spec in specs]
    assert len(rows) == 2 and all(r.ok and r.spills == 0 for r in rows), format_report(rows)
    if target == "sm_90a":
        assert all(r.wgmma for r in rows), format_report(rows)


@interpreted
def test_under_autocast_computes_in_its_dtype_and_trains_the_fp32_weights(assert_close_to_float64):
    # fp32 master weights and bias, fp16 products: as the PyTorch form, the bias adds in fp32
    tensors, groups, grad_out = _case([6, 0, 11], 32, 48, bias=True, transposed=True, seed=11)
    trained = ["x", "weight", "bias"]

    def autocast(form):
        def run(*args):
            with torch.autocast("cpu", dtype=torch.float16):
                return form(*args)
        return run

    got = _grads(autocast(_triton_form), tensors, groups, grad_out, torch.float32, trained)
    same = _grads(autocast(pytorch_form), tensors, groups, grad_out, torch.float32, trained)
    ref64 = _grads(pytorch_form, tensors, groups, grad_out, torch.float64, trained)
    assert [t.dtype for t in got] == [t.dtype for t in same] == [torch.float32] * 4
    assert_close_to_float64(got, ref64, same, torch.float16, "autocast fp16", ["out", *trained])
