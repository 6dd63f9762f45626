"""LoRA layers computed with the merged weight equal PEFT's own forward, values and gradients."""

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model

from sftplug.model.merged_lora import MergedLoRALinear, merged_weight, use_merged_forward


def lora_pair(dropout=0.0, bias=False, seed=0):
    """The same PEFT-wrapped layers twice: one routed through the merged path, one not."""
    torch.manual_seed(seed)
    layers = nn.ModuleDict({"up": nn.Linear(48, 80, bias=bias), "down": nn.Linear(80, 48, bias=bias)})
    layers.requires_grad_(False)
    config = LoraConfig(r=8, lora_alpha=24, lora_dropout=dropout, target_modules=["up", "down"])
    plain = inject_adapter_in_model(config, layers)
    for module in plain.modules():
        if hasattr(module, "lora_B"):  # PEFT starts B at zero; a trained adapter is not
            nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    merged = inject_adapter_in_model(config, nn.ModuleDict({"up": nn.Linear(48, 80, bias=bias),
                                                            "down": nn.Linear(80, 48, bias=bias)}))
    merged.load_state_dict(plain.state_dict())
    merged.requires_grad_(False)
    for name, p in merged.named_parameters():
        p.requires_grad_("lora_" in name)
    use_merged_forward(merged)
    return plain, merged


def run(layers, x):
    layers.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = layers["down"](torch.nn.functional.silu(layers["up"](x)))
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    grads = {n: p.grad.clone() for n, p in layers.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("bias", [False, True])
def test_merged_path_equals_peft_in_fp32(bias, monkeypatch):
    plain, merged = lora_pair(bias=bias)
    x = torch.randn(3, 7, 48)
    calls, original = [], MergedLoRALinear.apply
    monkeypatch.setattr(MergedLoRALinear, "apply", lambda *a: calls.append(1) or original(*a))
    y1, dx1, g1 = run(plain, x)
    y2, dx2, g2 = run(merged, x)
    assert len(calls) == 2  # both layers took the merged path
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx2, dx1, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys() and len(g1) == 4
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-5)


def test_merged_path_under_bf16_autocast_is_as_close_as_peft_to_fp32():
    plain, merged = lora_pair()
    x = torch.randn(4, 16, 48)
    exact = run(plain, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_bf16 = run(plain, x)
        ours_bf16 = run(merged, x)
    assert ours_bf16[0].dtype == torch.bfloat16
    for name in exact[2]:
        assert ours_bf16[2][name].dtype == torch.float32  # trainable weights and their grads stay fp32
        ours_err = (ours_bf16[2][name] - exact[2][name]).norm() / exact[2][name].norm()
        peft_err = (peft_bf16[2][name] - exact[2][name]).norm() / exact[2][name].norm()
        assert ours_err < max(2 * peft_err, 1e-2), name


@pytest.mark.parametrize("base", [torch.float32, torch.bfloat16], ids=["fp32-base", "bf16-base"])
def test_the_bf16_merged_weight_is_the_exact_sum_rounded_once(base):
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(64, 96, generator=g) * 0.05).to(base)
    a, b, scale = torch.randn(8, 96, generator=g) * 0.1, torch.randn(64, 8, generator=g) * 0.1, 3.0
    got = merged_weight(weight, a, b, scale, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == weight.shape
    exact = weight.double() + scale * b.double() @ a.double()
    # one rounding of the result, plus the rounding of A and B to bf16 inside the product
    ulp = 2.0**-8
    bound = ulp * exact.abs() + 2 * ulp * scale * (b.double().abs() @ a.double().abs()) + 1e-12
    assert bool(((got.double() - exact).abs() <= bound).all())
    # in fp32 it is the fp32 sum itself
    torch.testing.assert_close(merged_weight(weight, a, b, scale, torch.float32),
                               weight.float() + scale * b @ a, rtol=1e-6, atol=1e-7)


def test_dropout_in_training_goes_through_peft():
    plain, merged = lora_pair(dropout=0.2)
    x = torch.randn(2, 5, 48)
    torch.manual_seed(3)
    y1, _, g1 = run(plain, x)
    torch.manual_seed(3)
    y2, _, g2 = run(merged, x)
    assert torch.equal(y1, y2)  # the very same computation, dropout masks included
    merged.eval(), plain.eval()
    torch.testing.assert_close(run(merged, x)[0], run(plain, x)[0], rtol=1e-5, atol=1e-6)


def test_disabled_adapter_gives_the_base_layer():
    _, merged = lora_pair()
    x = torch.randn(2, 48)
    layer = merged["up"]
    layer.enable_adapters(False)
    torch.testing.assert_close(layer(x), layer.base_layer(x))
