"""The Triton GLU (SwiGLU and tanh-GeGLU) on the CPU, under the Triton interpreter.

The output and d(gate_up) are compared with a float64 plain-PyTorch reference: the
kernel's error may be at most twice the same-dtype PyTorch form's (plus a small floor).
The backward writes the gradient into the saved gate_up buffer; the tests check that it
does, and that this never changes what the caller can see.
"""

import pytest
import torch

pytest.importorskip("triton")

from sftplug.kernels.glu import glu, glu_reference  # noqa: E402

pytestmark = [
    pytest.mark.interpreted,
    # exp(-z) of a very negative gate is inf in numpy (sigmoid 0, as on the GPU), with a warning
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

NAMES = ("out", "d_gate_up")
ACTIVATIONS = ("silu", "gelu_tanh")


def _inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    gate_up = 3 * torch.randn(*shape, generator=g)  # wide enough to reach both tails of the sigmoid
    dout = torch.randn(*shape[:-1], shape[-1] // 2, generator=g)
    return gate_up, dout


def _glu_of_product(gate_up, activation, block_size=None):
    # gate_up as the output of an op (like the gate_up linear), so the backward reuses its memory.
    return glu(gate_up * 1, activation, block_size=block_size)


CASES = [
    # shape of gate_up [..., 2I], block_size (None: the launcher's choice)
    ((1, 2 * 64), None),
    ((7, 2 * 100), None),  # I not a power of two: one masked block per row
    ((2, 3, 2 * 48), None),  # several leading dims
    ((5, 2 * 100), 16),  # seven blocks per row, the last one partial
    ((3, 2 * 64), 32),  # two full blocks per row
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,block_size", CASES)
def test_matches_reference(shape, block_size, activation, dtype, grads_of, assert_close_to_float64):
    gate_up, dout = _inputs(shape, seed=sum(shape) + (block_size or 0))
    got = grads_of(_glu_of_product, (gate_up,), dout, dtype, activation=activation, block_size=block_size)
    ref64 = grads_of(glu_reference, (gate_up,), dout, torch.float64, activation=activation)
    same = grads_of(glu_reference, (gate_up,), dout, dtype, activation=activation)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_close_to_float64(got, ref64, same, dtype, f"{activation} {shape} block={block_size}", NAMES)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_leaves_its_input_alone(activation):
    gate_up, _ = _inputs((4, 2 * 40), seed=1)
    given = gate_up.clone()
    out = glu(given, activation, block_size=16)
    assert torch.equal(given, gate_up)
    torch.testing.assert_close(out, glu_reference(gate_up, activation), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_writes_the_gradient_into_gate_up(activation):
    x, dout = _inputs((6, 2 * 40), seed=2)
    leaf = x.clone().requires_grad_()
    gate_up = leaf * 1
    out = glu(gate_up, activation)
    out_before = out.detach().clone()
    (grad,) = torch.autograd.grad(out, gate_up, dout)
    assert grad.data_ptr() == gate_up.data_ptr()  # no new [..., 2I] buffer: the saving is real
    assert torch.equal(out, out_before)  # the output has memory of its own
    assert torch.equal(leaf.detach(), x)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_repeated_passes_give_identical_gradients(activation):
    # The in-place backward must not leak into the next use of the same inputs: both
    # through an op's output (reused in place) and with the leaf itself (copied first).
    x, dout = _inputs((3, 2, 2 * 24), seed=3)
    leaf = x.clone().requires_grad_()
    through_op, direct = [], []
    for _ in range(2):
        glu(leaf * 1, activation, block_size=16).backward(dout)
        through_op.append(leaf.grad)
        leaf.grad = None
        glu(leaf, activation, block_size=16).backward(dout)
        direct.append(leaf.grad)
        leaf.grad = None
    assert torch.equal(leaf.detach(), x)
    assert all(torch.equal(g, through_op[0]) for g in through_op + direct)
    x64 = x.double().requires_grad_()
    glu_reference(x64, activation).backward(dout.double())
    torch.testing.assert_close(through_op[0].double(), x64.grad, rtol=0, atol=1e-5)


def test_a_reader_of_the_overwritten_buffer_fails_loudly():
    x, dout = _inputs((4, 2 * 32), seed=4)
    leaf = x.clone().requires_grad_()
    gate_up = leaf * 1
    squares = (gate_up ** 2).sum()  # saves gate_up for its backward, which runs after glu's
    out = glu(gate_up)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.backward([out, squares], [dout, torch.ones(())])
    out = glu(leaf * 1)
    out.backward(dout, retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        out.backward(dout)  # the saved gate_up now holds the first backward's gradient


def test_strided_rows_and_gradient():
    # Rows of a wider tensor (row stride > 2I), rows repeated by expand (stride 0: copied
    # before the backward writes), and a gradient not contiguous in its last dim.
    x, _ = _inputs((5, 2 * 24 + 6), seed=5)
    g = torch.Generator().manual_seed(6)
    dout = torch.randn(24, 5, generator=g).t()  # [5, 24], last dim strided
    for make in (lambda t: (t * 1)[:, :48], lambda t: (t * 1)[:1, :48].expand(5, 48)):
        leaf = x.clone().requires_grad_()
        glu(make(leaf), "gelu_tanh", block_size=16).backward(dout)
        x64 = x.double().requires_grad_()
        glu_reference(make(x64), "gelu_tanh").backward(dout.double())
        torch.testing.assert_close(leaf.grad.double(), x64.grad, rtol=0, atol=1e-5)


def test_input_checks():
    gate_up, _ = _inputs((2, 2 * 8), seed=7)
    with pytest.raises(ValueError, match="unknown activation"):
        glu(gate_up, "relu")
    with pytest.raises(ValueError, match="unknown activation"):
        glu_reference(gate_up, "gelu")
    with pytest.raises(ValueError, match="even"):
        glu(gate_up[:, :15])
    with pytest.raises(ValueError, match="power of two"):
        glu(gate_up, block_size=24)
