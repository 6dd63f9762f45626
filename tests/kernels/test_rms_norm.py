"""The fused RMSNorm kernels on the CPU, under the Triton interpreter.

Output, dx and dweight are compared with the float64 plain-PyTorch reference: the kernel's
error may be at most twice the error of the same-dtype reference (plus a small floor).
Shapes are tiny: the interpreter runs each program in Python.
"""

import pytest
import torch

pytest.importorskip("triton")

import sftplug.kernels.rms_norm as rms_norm_module  # noqa: E402
from sftplug.fused import pytorch as pytorch_forms  # noqa: E402
from sftplug.kernels.rms_norm import (  # noqa: E402
    compile_specs,
    rms_norm,
    rms_norm_available,
    rms_norm_reference,
)

pytestmark = pytest.mark.interpreted

EPS = 1e-6
NAMES = ("out", "dx", "dweight")
# (x's dtype, weight's dtype): fp32 throughout, half activations with fp32 weights (output
# promoted to fp32), and a LoRA run's frozen half base (weight in x's dtype).
DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.float16, torch.float16)]
DTYPE_IDS = ["x32-w32", "x16-w32", "x16-w16"]
# (shape, block_size): one row, C not a power of two, two leading dims, and rows longer than
# one block (the looping kernels: 200 columns in 4 chunks of 64, 130 in 5 chunks of 32).
SHAPES = [((1, 64), None), ((7, 200), None), ((3, 5, 96), None), ((7, 200), 64), ((2, 3, 130), 32)]
SHAPE_IDS = ["1x64", "7x200", "3x5x96", "7x200-block64", "2x3x130-block32"]


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 2
    weight = 1 + 0.3 * torch.randn(shape[-1], generator=g)
    dy = torch.randn(*shape, generator=g)
    return x, weight, dy


def _grads(fn, x, weight, dy, x_dtype, weight_dtype, trainable=True, **kw):
    """[out, dx, dweight (if trainable)] of fn on copies of x and weight in these dtypes."""
    x = x.detach().to(x_dtype).requires_grad_()
    weight = weight.detach().to(weight_dtype).requires_grad_(trainable)
    out = fn(x, weight, EPS, **kw)
    wanted = [x, weight] if trainable else [x]
    return [out.detach(), *torch.autograd.grad(out, wanted, dy.to(out.dtype))]


@pytest.mark.parametrize("trainable", [True, False], ids=["trained", "frozen"])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("x_dtype,weight_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,block_size", SHAPES, ids=SHAPE_IDS)
def test_matches_reference(shape, block_size, x_dtype, weight_dtype, gemma, trainable, assert_close_to_float64):
    x, weight, dy = _inputs(shape, seed=shape[-1])
    got = _grads(rms_norm, x, weight, dy, x_dtype, weight_dtype, trainable, gemma=gemma, block_size=block_size)
    ref64 = _grads(rms_norm_reference, x, weight, dy, torch.float64, torch.float64, trainable, gemma=gemma)
    same = _grads(rms_norm_reference, x, weight, dy, x_dtype, weight_dtype, trainable, gemma=gemma)
    what = f"{shape} block={block_size} {x_dtype}/{weight_dtype} gemma={gemma}"
    assert_close_to_float64(got, ref64, same, x_dtype, what, NAMES)

    out_dtype = x_dtype if gemma else torch.promote_types(x_dtype, weight_dtype)
    assert got[0].dtype == out_dtype, f"{what}: out is {got[0].dtype}"
    assert got[1].dtype == x_dtype, f"{what}: dx is {got[1].dtype}"
    if trainable:
        assert got[2].dtype == weight_dtype, f"{what}: dweight is {got[2].dtype}"


class _BackwardSpy:
    """Stands in for the backward kernel: records each launch's WEIGHT_GRAD, then launches it."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.weight_grad = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.weight_grad.append(kwargs["WEIGHT_GRAD"])
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("block_size", [None, 32], ids=["one-block", "looping"])
@pytest.mark.parametrize("trainable", [True, False], ids=["trained", "frozen"])
def test_dweight_only_for_a_trained_weight(trainable, block_size, monkeypatch, assert_close_to_float64):
    spy = _BackwardSpy(rms_norm_module._rms_norm_bwd_kernel)
    monkeypatch.setattr(rms_norm_module, "_rms_norm_bwd_kernel", spy)
    x, weight, dy = _inputs((5, 80), seed=3)
    x = x.clone().requires_grad_()
    weight = weight.clone().requires_grad_(trainable)
    rms_norm(x, weight, EPS, block_size=block_size).backward(dy)

    assert spy.weight_grad == [trainable]  # frozen: the kernel's dweight code is compiled out
    assert (weight.grad is not None) == trainable
    ref64 = _grads(rms_norm_reference, x, weight, dy, torch.float64, torch.float64, trainable)
    same = _grads(rms_norm_reference, x, weight, dy, torch.float32, torch.float32, trainable)
    got = [x.grad] + ([weight.grad] if trainable else [])
    assert_close_to_float64(got, ref64[1:], same[1:], torch.float32, f"trainable={trainable}", NAMES[1:])


def _strided_views(x):
    """x's values as views whose memory is not [rows, C] contiguous."""
    rows, C = x.shape[0], x.shape[-1]
    transposed = x.t().contiguous().t()  # columns not contiguous: the launcher copies
    wide = torch.zeros(rows, C + 13)
    wide[:, :C] = x
    return {"transposed": transposed, "row-strided": wide[:, :C]}  # the kernel reads the row stride


@pytest.mark.parametrize("view", ["transposed", "row-strided", "leading-dims-transposed"])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_non_contiguous_x_matches_contiguous(view, gemma):
    x, weight, dy = _inputs((6, 72), seed=7)
    if view == "leading-dims-transposed":
        x, dy = x.view(2, 3, 72), dy.view(2, 3, 72)
        strided = x.transpose(0, 1).contiguous().transpose(0, 1)
    else:
        strided = _strided_views(x)[view]
    assert not strided.is_contiguous() and torch.equal(strided, x)
    expected = _grads(rms_norm, x, weight, dy, torch.float32, torch.float32, gemma=gemma)

    leaf = strided.detach().requires_grad_()  # still the strided view
    w = weight.clone().requires_grad_()
    out = rms_norm(leaf, w, EPS, gemma=gemma)
    got = [out.detach(), *torch.autograd.grad(out, [leaf, w], dy)]
    for name, a, b in zip(NAMES, got, expected):
        assert a.shape == b.shape and torch.equal(a, b), f"{view} {name}: differs from the contiguous x"


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("x_dtype,weight_dtype", DTYPES, ids=DTYPE_IDS)
def test_reference_is_the_models_pytorch_form(x_dtype, weight_dtype, gemma):
    # The model's own RMSNorm (sftplug.fused.pytorch) and the reference round at the same points.
    x, weight, _ = _inputs((4, 48), seed=11)
    x, weight = x.to(x_dtype), weight.to(weight_dtype)
    expected = pytorch_forms.rmsnorm(x, weight, EPS, gemma)
    got = rms_norm_reference(x, weight, EPS, gemma)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_no_rows():
    x = torch.zeros(0, 3, 64, requires_grad=True)
    weight = torch.ones(64, requires_grad=True)
    out = rms_norm(x, weight, EPS)
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(weight.grad, torch.zeros(64))


def test_rejects_bad_inputs():
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(32), EPS)
    with pytest.raises(ValueError, match="bf16"):  # the interpreter rounds bf16 wrongly
        rms_norm(x.bfloat16(), torch.ones(64, dtype=torch.bfloat16), EPS)
    with pytest.raises(ValueError, match="power of two"):
        rms_norm(x, torch.ones(64), EPS, block_size=48)


def test_available_under_the_interpreter():
    ok, why = rms_norm_available()
    assert ok, why
    assert "interpreter" in why


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_compile_specs_describe_every_argument(dtype):
    block, num_warps, num_stages = rms_norm_module._launch_config(2048)
    specs = compile_specs(dtype)
    assert {s["name"] for s in specs} == {"rms_norm_fwd", "rms_norm_bwd"}
    for spec in specs:
        fn, signature = spec["fn"], spec["signature"]
        assert list(signature) == list(fn.arg_names), spec["name"]
        constexpr_names = {n for n, t in signature.items() if t == "constexpr"}
        assert set(spec["constexprs"]) == constexpr_names, spec["name"]
        assert spec["constexprs"]["BLOCK"] == block and spec["constexprs"]["ONE_BLOCK"]
        assert (spec["num_warps"], spec["num_stages"]) == (num_warps, num_stages)
        assert set(spec["divisible"]) <= set(signature) - constexpr_names, spec["name"]
        assert signature["X"] in (f"*{dtype}", "*fp32")
