"""The model's hand-written pieces against plain autograd."""

import torch

from sftplug.model.transformer import apply_rope


def test_rope_matches_the_textbook_formula_and_its_gradient_checks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    angles = torch.randn(2, 5, 1, 4, dtype=torch.float64, generator=g)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.chunk(2, dim=-1)
    textbook = x * torch.cat((cos, cos), -1) + torch.cat((-x2, x1), -1) * torch.cat((sin, sin), -1)
    torch.testing.assert_close(apply_rope(x, cos, sin), textbook, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: apply_rope(x, cos, sin), (x,))
