import pytest
import torch


@pytest.fixture(scope="session")
def grads_of():
    """``grads_of(fn, q, k, v, do, dtype, **kw)``: [out, dq, dk, dv] of ``fn`` on copies of q, k, v in dtype."""

    def run(fn, q, k, v, do, dtype, **kw):
        x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*x, **kw)
        grads = torch.autograd.grad(out, x, do.to(dtype))
        return [out.detach(), *grads]

    return run
