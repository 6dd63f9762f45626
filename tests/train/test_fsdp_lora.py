"""LoRA under FSDP2: sharded like a full fine-tune, trained as one process trains, checkpointed as an adapter.

The torchrun run here is also the several-nodes run: two torchrun launchers on this machine
(``--nnodes 2``, one process each, one shared OUT) meet at a c10d rendezvous.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from sftplug import distributed
from sftplug.checkpoint import folders, shards
from sftplug.config import DEFAULT_DATA, TrainConfig
from sftplug.model.lora import apply_lora, lora_layers
from sftplug.model.transformer import ModelConfig, Transformer

COMMON = ["--steps", "4", "--seq-len", "64", "--log-every", "1", "--sample-prompt", "Hi", "--accum", "2",
          "--save-every", "2"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def sftplug_train(out, model, data, *extra) -> list[str]:
    return ["-m", "sftplug", "train", "--out", str(out), "--model", str(model), "--data", str(data), *COMMON, *extra]


def finish(procs, timeout=240) -> str:
    """Wait for every launcher; the output of the one whose rank 0 printed the summary."""
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            outputs.append(stdout)
            assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    finally:
        for proc in procs:
            proc.kill()
    return next(out for out in outputs if "done:" in out)


def launch(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on shared cores
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def two_nodes(outs, model, data, *extra) -> str:
    """Two torchrun launchers, one process each, as two nodes would start them (c10d rendezvous)."""
    port = free_port()
    return finish([launch(["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-backend",
                           "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", *sftplug_train(out, model, data, *extra)])
                   for node, out in enumerate(outs)])


def metrics(out, key="loss"):
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


def lora_model(dtype=torch.float32):
    model = Transformer(ModelConfig(vocab_size=1024, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4,
                                    n_kv_heads=2))
    model.init_weights(0)
    model.to(dtype).requires_grad_(False)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-base"])
def test_sharded_lora_keeps_b_block_diagonal_and_trains_as_unsharded(one_process_group, dtype):
    plain, sharded = lora_model(dtype), lora_model(dtype)
    assert distributed.shard(sharded) == []
    assert all(hasattr(p, "full_tensor") for p in sharded.parameters())  # the bf16 base with its fp32 adapters
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (plain, sharded)]
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for model, optimizer in zip((plain, sharded), optimizers):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                logits = model(ids, torch.arange(16).expand(2, 16), None)
            logits.float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    fused = [layer for _, layer in lora_layers(sharded) if len(layer.lora_parts) > 1]
    assert fused and all(bool((off_diagonal(layer) == 0).all()) for layer in fused)
    # one rank: the same sums as unsharded, so bitwise the same adapter
    trained = dict(sharded.named_parameters())
    for name, p in plain.named_parameters():
        if p.requires_grad:
            assert torch.equal(trained[name].full_tensor(), p), name


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


def test_fsdp_lora_over_two_nodes_equals_one_process_resumes_and_exports(tmp_path, make_hf_folder, registry):
    from transformers import AutoModelForCausalLM

    from sftplug.checkpoint.export import export_checkpoint
    from sftplug.loading import load_model
    from sftplug.train.loop import train

    hf = tmp_path / "hf"
    make_hf_folder(hf)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:200]))
    one, two = tmp_path / "one", tmp_path / "two"
    options = dict(steps=4, seq_len=64, log_every=1, sample_prompt="Hi", accum=2, save_every=2)
    train(TrainConfig(out=str(one), model=str(hf), data=str(data), micro_bsz=4, **options), registry,
          echo=lambda *a: None)
    output = two_nodes([two, two], hf, data, "--micro-bsz", "2", "--strategy", "fsdp")
    assert output.count("precision:") == 1 and "out:" not in output  # rank 0 speaks; both nodes see one OUT

    # Each update's loss and gradient norm as one process's: fp32 rounding of the same sums in
    # another order (see test_distributed). The adapter after Adam: Adam divides by sqrt(v), which
    # turns rounding-level differences of near-zero gradient entries into larger steps in a few
    # entries, so each tensor is compared as a whole (a rank's tokens missing moves it by 10% or more).
    assert metrics(two) == pytest.approx(metrics(one), rel=1e-6)
    assert metrics(two, "grad_norm") == pytest.approx(metrics(one, "grad_norm"), rel=1e-5)
    step4 = two / "checkpoints" / "step-4"
    expected, adapter = folders.load_weights(one / "checkpoints" / "step-4"), folders.load_weights(step4)
    assert adapter.keys() == expected.keys()
    for name, weight in expected.items():
        assert float((adapter[name] - weight).norm() / weight.norm()) < 1e-3, name

    # The checkpoint: each rank's shards of the adapter and its optimizer state, nothing of the base.
    assert sorted(p.name for p in (step4 / folders.SHARDS).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    loaded = load_model(str(step4)).model.eval()
    assert adapter.keys() == {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert all(torch.equal(p, adapter[n]) for n, p in loaded.named_parameters() if p.requires_grad)
    fused = [layer for _, layer in lora_layers(loaded) if len(layer.lora_parts) > 1]
    assert fused and all(not off_diagonal(layer).any() for layer in fused)  # the gradient hook held under FSDP
    exported = export_checkpoint(step4, tmp_path / "export")["model"]
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()(ids).logits
        torch.testing.assert_close(logits, loaded(ids), rtol=1e-4, atol=1e-4)

    # Resumed from step 2 in one launcher's two processes: the same updates, bitwise.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(two / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    finish([launch(["--nproc-per-node", "2", "--master-port", free_port(),
                    *sftplug_train(resumed, hf, data, "--micro-bsz", "2", "--strategy", "fsdp", "--resume", "auto")])])
    assert metrics(resumed) == metrics(two)[2:]
    final = folders.load_weights(resumed / "checkpoints" / "step-4")
    assert all(torch.equal(final[n], adapter[n]) for n in adapter)
