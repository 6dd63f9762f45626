import pytest
import torch
import torch.nn.functional as F

from sftplug.data.packing import IGNORE
from sftplug.train.loss import target_loss_sum


@pytest.mark.parametrize("chunk_size", [3, 7, 4096])
@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_loss_equals_plain_cross_entropy(chunk_size, train_head):
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=train_head)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = IGNORE  # a masked prompt
    labels[1, -2:] = IGNORE  # padding
    total, count = target_loss_sum(hidden, labels, weight, chunk_size=chunk_size)
    expected = reference_loss_sum(hidden, labels, weight)
    assert count == int((labels != IGNORE).sum())
    torch.testing.assert_close(total.double(), expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(3 * total, [hidden] + ([weight] if train_head else []))
    expected_grads = torch.autograd.grad(3 * expected, [hidden] + ([weight] if train_head else []))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)



def reference_loss_sum(hidden, labels, weight):
    """The same sum computed the plain way: full logits, then cross-entropy."""
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")

def test_masked_positions_never_reach_the_head():
    hidden = torch.randn(1, 6, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    labels = torch.full((1, 6), IGNORE)
    labels[0, 3] = 5
    total, count = target_loss_sum(hidden, labels, weight)
    total.backward()
    assert count == 1
    assert hidden.grad[0, [0, 1, 2, 4, 5]].abs().sum() == 0
    assert hidden.grad[0, 3].abs().sum() > 0


def test_bf16_autocast_matches_fp32_closely():
    torch.manual_seed(1)
    hidden = torch.randn(3, 5, 32)
    weight = torch.randn(64, 32) * 0.1
    labels = torch.randint(0, 64, (3, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = target_loss_sum(hidden, labels, weight)
    high, _ = target_loss_sum(hidden, labels, weight)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, high, rtol=2e-2, atol=0)


def test_confident_wrong_predictions_give_a_finite_exact_loss():
    # A target whose probability underflows fp32 (loss about 200): no -inf, no NaN.
    hidden = torch.eye(4, 8)[None].clone().requires_grad_()  # [1, 4, 8]
    weight = torch.zeros(10, 8)
    weight[0, :4] = 200.0  # every position is sure of token 0
    labels = torch.tensor([[3, 0, 7, IGNORE]])
    total, _ = target_loss_sum(hidden, labels, weight)
    expected = reference_loss_sum(hidden.double(), labels, weight.double())
    assert torch.isfinite(total)
    torch.testing.assert_close(total.double(), expected, rtol=1e-6, atol=0)
    total.backward()
    assert torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("scale,softcap", [(1.0, 0.5), (4.0, 0.0), (2.0, 3.0)])
def test_scaled_and_soft_capped_logits_are_the_models(scale, softcap):
    # Granite divides the logits, Gemma 2 soft-caps them: the loss must see the model's logits
    from sftplug.model.transformer import logits_of

    torch.manual_seed(2)
    hidden = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (2, 7))
    labels[0, :3] = IGNORE
    total, _ = target_loss_sum(hidden, labels, weight, chunk_size=4, logit_scale=scale, logit_softcap=softcap)
    logits = logits_of(F.linear(hidden, weight), scale, softcap)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(total, [hidden, weight]), torch.autograd.grad(expected, [hidden, weight])):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
