"""The model's hand-written pieces against plain autograd."""

import pytest
import torch

from sftplug.fused.pytorch import rope


@pytest.mark.parametrize("rotary_dim", [8, 4], ids=["full", "partial"])
def test_rope_matches_the_textbook_formula_and_its_gradient_checks(rotary_dim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    angles = torch.randn(2, 5, 1, rotary_dim // 2, dtype=torch.float64, generator=g)
    cos, sin = angles.cos(), angles.sin()
    rot, tail = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    textbook = rot * torch.cat((cos, cos), -1) + torch.cat((-x2, x1), -1) * torch.cat((sin, sin), -1)
    expected = torch.cat((textbook, tail), -1)
    got = rope(x, cos, sin, 2)  # heads 0 and 1 rotated, head 2 (a value head) as it was
    torch.testing.assert_close(got[:, :, :2], expected[:, :, :2], rtol=0, atol=1e-12)
    assert torch.equal(got[:, :, 2], x[:, :, 2])
    assert torch.autograd.gradcheck(lambda x: rope(x, cos, sin, 2), (x,))
