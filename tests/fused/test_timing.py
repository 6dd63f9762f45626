"""The op cases `auto` and `sftplug bench ops` time: grouped_linear's inputs are a mixture of
experts' routed rows, the same values for the float64 reference, and train as the run does."""

import dataclasses

import torch

from sftplug.fused import FusedOpsRequest, pytorch
from sftplug.fused.timing import case_for, outputs

MOE = FusedOpsRequest(device=torch.device("cpu"), dtype=torch.float16, hidden_size=32, intermediate_size=96,
                      head_dim=16, rotary_dim=16, n_heads=4, n_kv_heads=2, vocab_size=100, tokens=24, experts=6,
                      expert_intermediate_size=40, top_k=3)


def test_grouped_linear_rows_are_each_tokens_top_k_rows_sorted_by_expert():
    case = case_for("grouped_linear", MOE)
    assert case.shape == "72 x 32 -> 6 x 80"
    (x, groups, weight), grad, leaves = case.make()
    assert x.shape == (72, 32) and weight.shape == (6, 80, 32) and grad.shape == (72, 80)
    assert groups.ends.dtype == torch.int32 and int(groups.ends[-1]) == 72
    assert torch.equal(groups.expert, groups.expert.sort().values)
    counts = torch.bincount(groups.expert, minlength=6)
    assert torch.equal(groups.ends, counts.cumsum(0).int())
    assert leaves == [x, weight]  # full fine-tuning: the weights train


def test_grouped_linear_float64_inputs_are_the_same_values():
    lora = case_for("grouped_linear", dataclasses.replace(MOE, lora_rank=4))
    (x, groups, weight, bias, (a, b, scale)), grad, leaves = lora.make()
    (x64, groups64, weight64, _, (a64, b64, _)), grad64, _ = lora.make(float64=True)
    assert bias is None and leaves == [x, a, b] and not weight.requires_grad
    assert a.shape == (6, 4, 32) and b.shape == (6, 80, 4)
    for t, t64 in ((x, x64), (weight, weight64), (a, a64), (b, b64), (grad, grad64)):
        assert t64.dtype == torch.float64 and torch.equal(t.double(), t64)
    assert torch.equal(groups.ends, groups64.ends)


def test_the_pytorch_form_runs_the_case_and_differentiates_every_leaf():
    case = case_for("grouped_linear", dataclasses.replace(MOE, dtype=torch.float32, lora_rank=4))
    out, dx, da, db = outputs(pytorch.grouped_linear, *case.make())
    assert out.shape == (72, 80) and dx.shape == (72, 32) and da.shape == (6, 4, 32) and db.shape == (6, 80, 4)
