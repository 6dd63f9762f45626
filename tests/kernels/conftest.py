"""Kernel tests: the Triton interpreter runs only in processes started with TRITON_INTERPRET=1.

@triton.jit picks interpreter or compiler when it decorates (triton's own library when
triton is first imported, each kernel when its module is imported), so one process cannot
hold both. Modules marked ``pytestmark = pytest.mark.interpreted`` therefore run in such a
process only: test_interpreted.py starts one child pytest for all of them, and this
process (compiled kernels, the compile report, GPU tests) skips them.
"""

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    # the interpreter's child pytest first: with --dist loadfile it then runs beside the other files,
    # not after them
    items.sort(key=lambda item: item.nodeid.split("::")[0] != "tests/kernels/test_interpreted.py")
    if INTERPRETED:
        return
    interpreted = [item for item in items if item.get_closest_marker("interpreted")]
    if interpreted:  # deselected here: test_interpreted.py runs them
        config.hook.pytest_deselected(items=interpreted)
        items[:] = [item for item in items if not item.get_closest_marker("interpreted")]


@pytest.fixture(scope="session")
def grads_of():
    """``grads_of(fn, inputs, grad_out, dtype, **kw)``: [out, *grads] of ``fn`` on copies of the
    float inputs in ``dtype`` (integer tensors and other arguments go in as they are)."""

    def run(fn, inputs, grad_out, dtype, **kw):
        x = [t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t for t in inputs]
        out = fn(*x, **kw)
        wanted = [t for t in x if t.requires_grad]
        grads = torch.autograd.grad(out, wanted, grad_out.to(out.dtype))
        return [out.detach(), *grads]

    return run


@pytest.fixture(scope="session")
def assert_close_to_float64():
    """``check(got, ref64, same, dtype, what, names)``: each tensor's error against the float64
    reference is at most twice the same-dtype PyTorch form's error plus a few roundings of the
    dtype, relative to the largest reference value (a broken kernel is off by O(1))."""

    floor = {torch.float32: 16 * torch.finfo(torch.float32).eps, torch.float16: torch.finfo(torch.float16).eps}

    def check(got, ref64, same, dtype, what, names):
        for name, a, r, s in zip(names, got, ref64, same):
            assert a.shape == r.shape, f"{what} {name}: shape {tuple(a.shape)} != {tuple(r.shape)}"
            assert torch.isfinite(a).all(), f"{what} {name}: not finite"
            err = (a.double() - r).abs().max().item()
            base = (s.double() - r).abs().max().item()
            allowed = 2 * base + floor[dtype] * max(1.0, r.abs().max().item())
            assert err <= allowed, f"{what} {name}: error {err:.3g} > 2 x torch's {base:.3g} + floor"

    return check
