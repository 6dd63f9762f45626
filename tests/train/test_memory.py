"""sftplug.train.memory against built runs on the CPU: persistent bytes byte for byte (parameters, 4-bit
weights and their scales, gradients, optimizer state) and the unique storages autograd saves in a forward."""

import re
from pathlib import Path

import pytest
import torch

from sftplug.data.packing import IGNORE, Rows
from sftplug.errors import SftplugError
from sftplug.train import memory
from sftplug.train.setup import build_run

README = Path(__file__).resolve().parents[2] / "README.md"
TABLE_START, TABLE_END = "<!-- memory-table: python -m sftplug.train.memory -->", "<!-- /memory-table -->"


def one_document_rows(n=8, t=64, vocab=1024) -> Rows:
    """Full rows of one document each, the first quarter prompt: every micro-batch has 2 x 64 tokens."""
    tokens = torch.randint(0, vocab, (n, t + 1), generator=torch.Generator().manual_seed(0))
    labels = tokens[:, 1:].clone()
    labels[:, : t // 4] = IGNORE
    return Rows(tokens[:, :-1].contiguous(), labels, torch.arange(t).expand(n, t).clone(),
                torch.zeros(n, t, dtype=torch.int32), torch.ones(n, dtype=torch.long))


def storage_bytes(tensors) -> dict[int, int]:
    """Unique storages: address -> bytes."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def quant_state_tensors(param) -> list:
    state = getattr(param, "quant_state", None)
    if state is None:
        return []
    return [state.absmax, state.code] + ([state.offset, state.state2.absmax, state.state2.code] if state.nested else [])


def model_storages(model) -> dict[int, int]:
    tensors = list(model.parameters()) + list(model.buffers())
    return storage_bytes(tensors + [t for p in model.parameters() for t in quant_state_tensors(p)])


def setting_of(run, mb, targets: int) -> memory.Setting:
    c = run.config
    return memory.Setting(mode="full" if c.full else ("lora" if c.quantize == "none" else c.quantize),
                          dtype=run.precision.name, optimizer=c.optimizer, tokens=mb["input_ids"].numel(),
                          targets=targets, grad_ckpt=c.grad_ckpt, attention=run.attention.backend.name,
                          lora_r=c.lora_r, lora_targets=c.lora_targets, double_quant=c.double_quant)


def saved_bytes(run, mb) -> tuple[int, int]:
    """(bytes of the unique storages autograd saves in one training forward, parameters' excluded; targets)."""
    persistent, saved = model_storages(run.model), {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in persistent:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total, targets = run.loss_sum(mb)
    return sum(saved.values()), targets


CASES = {
    "lora fp32": dict(),
    "full fp32": dict(full=True),
    "lora adamw8bit": dict(optimizer="adamw8bit"),
    "nf4": dict(quantize="nf4"),
    "fp4 without double quantization": dict(quantize="fp4", double_quant=False),
    "full adamw8bit": dict(full=True, optimizer="adamw8bit"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_built_run_has_the_modelled_bytes(case, small_config, registry, quiet):
    """The tiny preset in fp32 with chunked attention (the CPU's kernel for rows of one document)."""
    options = CASES[case]
    if options.get("quantize") or options.get("optimizer") == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    run = build_run(small_config(attention="chunked", **options), registry, echo=quiet, rows=one_document_rows())
    check_run(run)


def test_bf16_runs_have_the_modelled_bytes(small_config, registry, make_hf_folder, tmp_path, quiet):
    """bf16 autocast with SDPA's flash kernel (the GPU's dtype and kernel, here on the CPU), on an HF folder
    (hidden 64, 2 layers), LoRA, QLoRA and full fine-tuning."""
    make_hf_folder(tmp_path / "hf")
    modes = [dict(), dict(full=True)]
    try:
        import bitsandbytes  # noqa: F401

        modes.append(dict(quantize="nf4"))
    except ImportError:
        pass
    for i, options in enumerate(modes):
        config = small_config(model=str(tmp_path / "hf"), dtype="bf16", attention="flash", out=str(tmp_path / f"{i}"),
                              **options)
        check_run(build_run(config, registry, echo=quiet, rows=one_document_rows()))


def check_run(run):
    mb = run.batches.next()
    saved, targets = saved_bytes(run, mb)
    expected = memory.estimate(run.model.config, setting_of(run, mb, targets))
    assert saved == expected.activations
    run.update()  # the optimizer's state exists from the first step on
    everything = model_storages(run.model)
    trainable = storage_bytes(run.params)
    state = [v for s in run.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    total, _ = run.loss_sum(run.batches.next())
    total.backward()
    assert sum(v for k, v in everything.items() if k not in trainable) == expected.base
    assert sum(trainable.values()) == expected.trainable
    assert sum(storage_bytes(p.grad for p in run.params).values()) == expected.gradients
    assert sum(storage_bytes(state).values()) == expected.optimizer


def test_grad_ckpt_keeps_the_blocks_inputs(small_config, registry, monkeypatch, quiet):
    """Checkpointed, autograd saves what is outside the blocks and checkpoint holds each block's arguments;
    the model's activations are those plus one block's recompute (the term the runs above check)."""
    run = build_run(small_config(attention="chunked", grad_ckpt=True), registry, echo=quiet, rows=one_document_rows())
    persistent, held = model_storages(run.model), []
    checkpoint = torch.utils.checkpoint.checkpoint

    def holding(block, *args, **kwargs):
        held.extend(a for a in args if torch.is_tensor(a))
        return checkpoint(block, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", holding)
    mb = run.batches.next()
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, targets = run.loss_sum(mb)
    assert len(held) == 3 * run.model.config.n_layers  # x, cos, sin of each block
    kept = {k: v for k, v in {**seen, **storage_bytes(held)}.items() if k not in persistent}
    setting = setting_of(run, mb, targets)
    one_block = sum(x.total(setting.tokens) for x in memory.block_saved(run.model.config, setting))
    assert sum(kept.values()) == memory.estimate(run.model.config, setting).activations - one_block


def test_the_llama_shapes_have_their_parameter_counts():
    """The published sizes: 1.24B (tied), 8.03B and 70.6B parameters."""
    counts = {name: memory.model_params(config) for name, config in memory.LLAMA.items()}
    assert counts == {"Llama-3.2-1B": 1_235_814_400, "Llama-3.1-8B": 8_030_261_248, "Llama-3.1-70B": 70_553_706_496}


def test_bytes_per_parameter_of_the_persistent_part():
    """Full fine-tuning with AdamW: 4 (weights) + 4 (gradients) + 8 (moments) bytes per parameter, a
    16-byte step count per tensor aside; FSDP over 8 keeps an eighth."""
    config = memory.LLAMA["Llama-3.1-8B"]
    full = memory.estimate(config, mode="full")
    tensors = len(memory.trainable_tensors(config, memory.Setting(mode="full")))
    assert full.persistent - 4 * tensors - memory.buffer_bytes(config) == 16 * full.params
    sharded = memory.estimate(config, mode="full", world=8)
    assert sharded.trainable * 8 == full.trainable and sharded.gradients * 8 == full.gradients
    assert sharded.optimizer - 4 * tensors == (full.optimizer - 4 * tensors) / 8  # each rank counts its steps


def test_4bit_weights_cost_qlora_bits():
    """QLoRA's arithmetic: 4 bits a weight plus 32/64 bits of fp32 scales, or with double quantization
    8/64 + 32/(64 * 256) = 0.127 bits; the per-weight codes (273 fp32 values) are under 0.001 bits here."""
    n = 4096 * 4096
    assert round(memory.quantized_bytes(n, double_quant=False) * 8 / n, 3) == 4.5
    assert round(memory.quantized_bytes(n, double_quant=True) * 8 / n, 3) == 4.127


def test_unsupported_settings_are_one_line():
    with pytest.raises(SftplugError, match="^memory model: chunked attention computes in fp32 only"):
        memory.Setting(dtype="bf16", attention="chunked")
    with pytest.raises(SftplugError, match="^memory model: mode 'int8' is not one of full, lora, nf4, fp4$"):
        memory.Setting(mode="int8")


def test_the_readme_table_is_the_functions():
    text = README.read_text()
    if TABLE_START not in text:
        pytest.skip(f"README.md has no memory table yet (between {TABLE_START} and {TABLE_END})")
    found = re.search(re.escape(TABLE_START) + r"\n(.*?)\n" + re.escape(TABLE_END), text, re.S)
    assert found, f"README.md: {TABLE_START} without {TABLE_END}"
    assert found.group(1).strip() == memory.table()
