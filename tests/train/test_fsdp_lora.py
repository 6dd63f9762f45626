"""LoRA under FSDP2, in a process group of one rank in this process: FSDP2 swaps the parameters
for DTensors and unsharded copies just as with many ranks. tests/train/test_multinode.py trains
LoRA under FSDP in two processes."""

import pytest
import torch
import torch.distributed as dist

from sftplug import distributed
from sftplug.checkpoint import shards
from sftplug.errors import SftplugError
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
    assert distributed.shard(sharded) == 0  # no 4-bit weights
    assert all(hasattr(p, "full_tensor") for p in sharded.parameters())  # the bf16 base with its fp32 adapters
    train_both(plain, sharded, half=dtype == torch.bfloat16)
    fused = [layer for _, layer in lora_layers(sharded) if len(layer.lora_parts) > 1]
    assert fused and all(bool((off_diagonal(layer) == 0).all()) for layer in fused)
    assert_same_adapter(plain, sharded)


def test_qlora_shards_the_packed_4bit_base_and_trains_as_unsharded(one_process_group):
    pytest.importorskip("bitsandbytes")
    plain, sharded = lora_model(quantize="nf4"), lora_model(quantize="nf4")
    packed = {n: p.data.clone() for n, p in sharded.named_parameters() if getattr(p, "quant_state", None)}
    assert len(packed) == 8
    assert distributed.shard(sharded) == sum(t.numel() for t in packed.values())  # uint8: one byte each
    weights = dict(sharded.named_parameters())
    assert all(hasattr(p, "full_tensor") for p in weights.values())  # the 4-bit base sharded too
    assert all(torch.equal(weights[n].full_tensor(), t) for n, t in packed.items())
    train_both(plain, sharded, steps=2)
    assert_same_adapter(plain, sharded)


def test_dora_on_a_4bit_base_under_fsdp_is_refused_in_one_line(one_process_group):
    pytest.importorskip("bitsandbytes")
    model = Transformer(ModelConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, n_layers=1, n_heads=4,
                                    n_kv_heads=2))
    model.requires_grad_(False)
    quantize_model(model, quant_spec("nf4"))
    model = apply_lora(model, 4, 8, 0.0, ["q_proj"], "dora")
    with pytest.raises(SftplugError, match="^--strategy fsdp with --quantize and --lora-variant dora: PEFT's DoRA"):
        distributed.shard(model)


def test_the_shards_of_a_qlora_run_hold_the_adapter_alone(one_process_group, tmp_path):
    pytest.importorskip("bitsandbytes")
    model = lora_model(quantize="nf4")
    distributed.shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.arange(8)[None], torch.arange(8)[None], None).square().mean().backward()
    optimizer.step()
    shards.save(model, optimizer, tmp_path / "shards")
    saved = shards.read_full_weights(tmp_path / "shards")
    adapter = {n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    assert saved.keys() == adapter.keys()
    assert all(torch.equal(saved[n], adapter[n]) for n in adapter)
