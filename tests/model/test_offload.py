"""Activation offloading: only copies, so gradients and losses are bitwise those without it."""

import pytest
import torch

from sftplug.attention.choice import attach
from sftplug.model.lora import apply_lora
from sftplug.model.offload import ActivationOffloader, OffloadPass, describe_offload
from sftplug.model.transformer import ModelConfig, Transformer
from sftplug.train import lock
from sftplug.train.setup import build_run

SMALL = dict(vocab_size=1024, hidden_size=64, intermediate_size=96, n_layers=3, n_heads=4, n_kv_heads=2)


def small_model(registry, lora: bool, device="cpu", dtype=torch.float32, attention="auto", **shape) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**SMALL, **shape}))
    model.init_weights(seed=0)
    if lora:
        model.to(dtype).requires_grad_(False)
        model = apply_lora(model, 4, 8.0, 0.0, ("qkv", "o", "gate_up", "down"))
        with torch.no_grad():  # B starts at zero: make the LoRA path matter
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.1)
    model.to(device)
    attach(model, registry, attention, device, dtype)
    return model.train()


def batch(device="cpu"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 24), generator=g)
    return ids.to(device), torch.randint(0, SMALL["vocab_size"], (2, 24), generator=g).to(device)


def gradients(model, offload: bool, grad_ckpt: bool, dtype=torch.float32):
    model.offload_activations, model.checkpoint_blocks = offload, grad_ckpt
    model.zero_grad(set_to_none=True)
    ids, targets = batch(next(model.parameters()).device)
    device_type = ids.device.type
    with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["plain", "grad-ckpt"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_gradients_are_bitwise_those_without_offloading_and_nothing_is_left_held(registry, lora, grad_ckpt):
    model = small_model(registry, lora)
    if not lora:
        model.requires_grad_(True)
    expected = gradients(model, offload=False, grad_ckpt=grad_ckpt)
    got = gradients(model, offload=True, grad_ckpt=grad_ckpt)
    assert got.keys() == expected.keys() and got
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    offloader = model.offloader
    assert offloader.moved_tensors > 0 and offloader.moved_bytes > 0
    assert offloader.held == 0  # backward released every copy: no leak


def saved_in_forward(model, grad_ckpt: bool):
    """One forward's saved tensors as the offloader sorted them (plain facts, no references kept) and the loss."""
    model.offload_activations, model.checkpoint_blocks = True, grad_ckpt
    model.offloader = ActivationOffloader()
    saved = []
    original_pack = OffloadPass.pack

    def pack(self, tensor):
        result = original_pack(self, tensor)
        stored = None if isinstance(result, torch.Tensor) else result[0]
        saved.append(dict(storage=tensor.untyped_storage().data_ptr(), nbytes=tensor.untyped_storage().nbytes(),
                          shape=tuple(tensor.shape), kept=stored is None, block=stored and stored.block,
                          in_host=stored is not None and stored.host is not None, entry=stored and id(stored)))
        return result

    ids, _ = batch()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sftplug.model.offload.OffloadPass.pack", pack)
        loss = model(ids).float().square().mean()
    return saved, loss


def test_parameters_tiny_tensors_and_the_last_block_stay_on_the_device(registry):
    model = small_model(registry, lora=True)
    saved, loss = saved_in_forward(model, grad_ckpt=False)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert any(s["storage"] in params for s in saved if s["kept"])  # the frozen weights were saved, and kept
    for s in saved:
        if not s["kept"]:
            assert s["storage"] not in params and s["nbytes"] >= model.offloader.min_bytes
    last = len(model.layers) - 1
    in_host = [s for s in saved if s["in_host"]]
    assert in_host and all(s["block"] < last for s in in_host)
    assert {s["block"] for s in saved if not s["kept"] and not s["in_host"]} == {last}
    assert model.offloader.moved_tensors == len(in_host)  # every view counted, each storage's bytes once
    assert model.offloader.moved_bytes == sum({s["entry"]: s["nbytes"] for s in in_host}.values())
    assert model.offloader.held > 0
    loss.backward()
    assert model.offloader.held == 0


def test_with_grad_ckpt_only_the_block_inputs_are_offloaded(registry):
    model = small_model(registry, lora=True)
    saved, loss = saved_in_forward(model, grad_ckpt=True)
    offloaded = [s for s in saved if not s["kept"]]
    # one tensor per block, of the hidden states' shape: checkpoint's saved input, nothing from inside the block
    assert sorted(s["block"] for s in offloaded) == list(range(len(model.layers)))
    assert all(s["shape"] == (2, 24, SMALL["hidden_size"]) for s in offloaded)
    with pytest.MonkeyPatch.context() as patch:  # the recomputation in backward must not be offloaded again
        patch.setattr("sftplug.model.offload.OffloadPass.pack", lambda self, t: pytest.fail("packed in backward"))
        loss.backward()
    assert model.offloader.held == 0


def test_eval_no_grad_and_generation_forwards_are_untouched(registry):
    model = small_model(registry, lora=True)
    model.offload_activations = True
    ids, _ = batch()
    with torch.no_grad():
        model(ids)
    model.eval()
    model(ids).sum().backward()
    assert model.offloader is None  # no pass was ever made
    assert model.offload_pass(torch.device("cpu"), ()) is None
    model.train()
    assert model.offload_pass(torch.device("cpu"), ()) is not None


def test_describe_offload_says_the_cpu_saves_nothing():
    assert "saves no memory" in describe_offload("cpu", grad_ckpt=False)
    assert "input" in describe_offload("cpu", grad_ckpt=True)
    assert "side stream" in describe_offload("cuda", grad_ckpt=False)


@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["plain", "grad-ckpt"])
def test_training_losses_are_bitwise_those_without_and_the_header_says_so(small_config, tmp_path, registry,
                                                                          grad_ckpt):
    def losses(name, **options):
        lines = []
        config = small_config(out=str(tmp_path / name), steps=2, seq_len=32, grad_ckpt=grad_ckpt, **options)
        run = build_run(config, registry, echo=lines.append)
        try:
            return [run.update()["loss"] for _ in range(2)], lines
        finally:
            lock.release(run.out)

    plain, plain_lines = losses("plain")
    offloaded, lines = losses("offloaded", offload_activations=True)
    assert offloaded == plain
    assert f"activations: {describe_offload('cpu', grad_ckpt)}" in lines
    assert not any(line.startswith("activations:") for line in plain_lines)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading to host memory needs a CUDA device")
def test_cuda_bf16_lora_gradients_equal_and_peak_memory_lower(registry):
    # math attention: its backward is deterministic, so equal gradients are bitwise equal
    model = small_model(registry, lora=True, device="cuda", dtype=torch.bfloat16, attention="math", n_layers=6)
    big = torch.randint(0, SMALL["vocab_size"], (8, 1024), device="cuda")

    def run(offload: bool):
        model.offload_activations = offload
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model(big, hidden_only=True)
        hidden.float().square().mean().backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return grads, torch.cuda.max_memory_allocated()

    expected, peak_without = run(False)
    got, peak_with = run(True)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert peak_with < peak_without
    assert model.offloader.held == 0
