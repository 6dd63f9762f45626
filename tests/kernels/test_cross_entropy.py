"""The fused cross-entropy kernel on the CPU, under the Triton interpreter.

Losses and the logit gradient it writes in place are compared with a float64 plain-PyTorch
reference: the kernel's error may be at most twice the error of the same-dtype reference
(plus a small floor). Shapes are tiny: the interpreter runs each program in Python.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from sftplug.kernels.cross_entropy import (  # noqa: E402
    _launch_config,
    compile_specs,
    cross_entropy_,
    cross_entropy_available,
    cross_entropy_reference,
)

pytestmark = pytest.mark.interpreted

NAMES = ("losses", "grad")


def _inputs(n, V, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g) * scale
    targets = torch.randint(0, V, (n,), generator=g)
    targets[0] = 0  # the first and the last column as targets
    targets[-1] = V - 1
    return logits, targets


CASES = [
    # n, V, block_size (None: the launcher's choice, one block at these V)
    (1, 64, None),
    (7, 200, None),  # V not a power of two: the block's tail is masked
    (7, 200, 64),  # four blocks, the last one partial
    (5, 1000, 128),  # eight blocks per row
]


def test_available_under_the_interpreter():
    ok, why = cross_entropy_available()
    assert ok, why


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: the max shift keeps exp finite
@pytest.mark.parametrize("n,V,block_size", CASES)
def test_matches_float64_reference(n, V, block_size, scale, dtype, assert_close_to_float64):
    logits, targets = _inputs(n, V, scale, seed=n * 1000 + V)
    ref64 = cross_entropy_reference(logits.double(), targets)
    same = cross_entropy_reference(logits.to(dtype), targets)
    grad = logits.to(dtype)
    losses = cross_entropy_(grad, targets, block_size=block_size)
    assert losses.dtype == torch.float32 and grad.dtype == dtype
    what = f"n={n} V={V} block={block_size} scale={scale} {dtype}"
    assert_close_to_float64([losses, grad], ref64, same, dtype, what, NAMES)
    torch_sum = F.cross_entropy(logits.double(), targets, reduction="sum")
    assert_close_to_float64([losses.sum()], [torch_sum], [same[0].sum()], dtype, what, ("loss sum",))


def test_reference_is_torch_cross_entropy_and_its_gradient():
    logits, targets = _inputs(6, 50, scale=5.0, seed=3)
    x = logits.double().requires_grad_()
    expected = F.cross_entropy(x, targets, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    losses, grad = cross_entropy_reference(logits.double(), targets)
    torch.testing.assert_close(losses, expected.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


def test_gradient_overwrites_the_logits_in_place_and_nothing_else(assert_close_to_float64):
    n, V = 3, 150
    logits, targets = _inputs(n, V, seed=7)
    storage = torch.randn(n, V + 9)  # rows of a wider buffer: row stride V + 9
    storage[:, :V] = logits
    after_the_rows = storage[:, V:].clone()
    view = storage[:, :V]
    losses = cross_entropy_(view, targets, block_size=64)
    assert view.data_ptr() == storage.data_ptr()
    assert torch.equal(storage[:, V:], after_the_rows)  # the columns between the rows are untouched
    ref64 = cross_entropy_reference(logits.double(), targets)
    same = cross_entropy_reference(logits, targets)
    assert_close_to_float64([losses, storage[:, :V]], ref64, same, torch.float32, "strided rows", NAMES)


def test_a_target_outside_the_row_gives_nan_not_a_read_outside():
    logits, _ = _inputs(3, 40, seed=1)
    targets = torch.tensor([5, 40, -1])
    losses = cross_entropy_(logits.clone(), targets)
    assert torch.isfinite(losses[0]) and losses[1:].isnan().all()


def test_no_rows():
    logits = torch.empty(0, 32)
    losses = cross_entropy_(logits, torch.empty(0, dtype=torch.int64))
    assert losses.shape == (0,) and losses.dtype == torch.float32


def _bad_inputs():
    rows = torch.randn(4, 32)
    targets = torch.zeros(4, dtype=torch.int64)
    return {
        "1-D logits": (torch.randn(32), targets[:1], {}),
        "no columns": (torch.randn(4, 0), targets, {}),
        "float64 logits": (rows.double(), targets, {}),
        "integer logits": (rows.long(), targets, {}),
        "columns not contiguous": (torch.randn(32, 4).t(), targets, {}),
        "overlapping rows": (torch.randn(1, 32).expand(4, 32), targets, {}),
        "int32 targets": (rows, targets.int(), {}),
        "targets of another length": (rows, targets[:3], {}),
        "2-D targets": (rows, targets[:, None], {}),
        "block not a power of two": (rows, targets, {"block_size": 100}),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_inputs_raise_value_error_and_leave_the_logits(case):
    logits, targets, kwargs = _bad_inputs()[case]
    before = logits.clone()
    with pytest.raises(ValueError):
        cross_entropy_(logits, targets, **kwargs)
    assert torch.equal(logits, before)


def test_large_vocabularies_loop_over_blocks_and_compile_specs_match_the_launcher():
    for V in (32000, 128256, 151936, 262144):
        block, warps, _ = _launch_config(V)
        assert block <= 4096 < V and warps >= 1
    (spec,) = compile_specs("bf16")
    assert set(spec["signature"]) == set(spec["fn"].arg_names)
    block, warps, stages = _launch_config(32000)
    assert spec["constexprs"] == {"BLOCK": block}
    assert (spec["num_warps"], spec["num_stages"]) == (warps, stages)
    assert spec["signature"]["LOGITS"] == "*bf16" and compile_specs("fp16")[0]["signature"]["LOGITS"] == "*fp16"
