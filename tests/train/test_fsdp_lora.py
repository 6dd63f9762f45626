"""LoRA under FSDP2, in a process group of one rank in this process: FSDP2 swaps the parameters
for DTensors and unsharded copies just as with many ranks. tests/train/test_multinode.py trains
LoRA under FSDP in two processes."""

import pytest
import torch
import torch.distributed as dist

from sftplug import distributed
from sftplug.checkpoint import shards
from sftplug.model.lora import apply_lora, lora_layers
from sftplug.model.quantize import quant_spec, quantize_model
from sftplug.model.transformer import ModelConfig, Transformer


def lora_model(dtype=torch.float32, quantize=None):
    model = Transformer(ModelConfig(vocab_size=1024, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4,
                                    n_kv_heads=2))
    model.init_weights(0)
    model.to(dtype).requires_grad_(False)
    if quantize:
        quantize_model(model, quant_spec(quantize))
    torch.manual_seed(0)
    model = apply_lora(model, 4, 8, 0.0, ["q_proj", "v_proj", "gate_proj", "o_proj"])
    model.set_attention(plain_attention)
    return model


def plain_attention(q, k, v, causal=True, doc_ids=None, **options):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def off_diagonal(layer) -> torch.Tensor:
    """B's entries outside its diagonal blocks (zero in an exact per-projection LoRA)."""
    b = layer.lora_B["default"].weight
    b = (b.full_tensor() if hasattr(b, "full_tensor") else b).detach()
    r = b.shape[1] // len(layer.lora_parts)
    off = torch.ones(b.shape, dtype=torch.bool)
    for i, (_, start, end) in enumerate(layer.lora_parts):
        off[start:end, i * r:(i + 1) * r] = False
    return b[off]


@pytest.fixture
def one_process_group(tmp_path):
    """A process group of one rank in this process: FSDP2 swaps parameters just as with many."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def train_both(plain, sharded, steps=3, half=False):
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (plain, sharded)]
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        for model, optimizer in zip((plain, sharded), optimizers):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
                logits = model(ids, torch.arange(16).expand(2, 16), None)
            logits.float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()


def assert_same_adapter(plain, sharded):
    """One rank: the same sums as unsharded, so bitwise the same adapter."""
    trained = dict(sharded.named_parameters())
    for name, p in plain.named_parameters():
        if p.requires_grad:
            assert torch.equal(trained[name].full_tensor(), p), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-base"])
def test_sharded_lora_keeps_b_block_diagonal_and_trains_as_unsharded(one_process_group, dtype):
    plain, sharded = lora_model(dtype), lora_model(dtype)
    assert distributed.shard(sharded) == []
    assert all(hasattr(p, "full_tensor") for p in sharded.parameters())  # the bf16 base with its fp32 adapters
    train_both(plain, sharded, half=dtype == torch.bfloat16)
    fused = [layer for _, layer in lora_layers(sharded) if len(layer.lora_parts) > 1]
    assert fused and all(bool((off_diagonal(layer) == 0).all()) for layer in fused)
    assert_same_adapter(plain, sharded)


def test_qlora_shards_all_but_the_4bit_weights(one_process_group):
    pytest.importorskip("bitsandbytes")
    plain, sharded = lora_model(quantize="nf4"), lora_model(quantize="nf4")
    whole = distributed.shard(sharded)
    assert len(whole) == 8 and all(p.quant_state is not None and not hasattr(p, "full_tensor") for p in whole)
    assert all(hasattr(p, "full_tensor") for p in sharded.parameters() if all(p is not w for w in whole))
    train_both(plain, sharded, steps=2)
    assert_same_adapter(plain, sharded)


def test_4bit_weights_stay_whole_and_the_shards_hold_the_adapter_alone(one_process_group, tmp_path):
    model = lora_model()
    quantized = model.layers[0].mlp.down.weight
    quantized.quant_state = object()  # what marks bitsandbytes' Params4bit
    whole = distributed.shard(model)
    assert len(whole) == 1 and whole[0] is quantized
    assert model.layers[0].mlp.down.weight is quantized and not hasattr(quantized, "full_tensor")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.arange(8)[None], torch.arange(8)[None], None).square().mean().backward()
    optimizer.step()
    shards.save(model, optimizer, tmp_path / "shards")
    saved = shards.read_full_weights(tmp_path / "shards")
    adapter = {n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    assert saved.keys() == adapter.keys()
    assert all(torch.equal(saved[n], adapter[n]) for n in adapter)
