"""sftplug.train.memory against built runs on the CPU: persistent bytes byte for byte (parameters, 4-bit
weights and their scales, gradients, optimizer state) and the unique storages autograd saves in a forward."""

import dataclasses
import os
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from sftplug.data.packing import IGNORE, Rows
from sftplug.errors import SftplugError
from sftplug.loading import load_model
from sftplug.model.experts import MoE
from sftplug.model.lora import apply_lora
from sftplug.train import memory, memory_experts, memory_models, memory_shapes
from sftplug.train.setup import build_run

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
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
    aux_loss = run.balance is not None and run.balance.has_aux and bool(run.balance.coef)
    linear = [block.attn.backend.name for block in run.model.layers if hasattr(block.attn, "conv1d")]
    return memory.Setting(mode="full" if c.full else ("lora" if c.quantize == "none" else c.quantize),
                          dtype=run.precision.name, optimizer=c.optimizer, tokens=mb["input_ids"].numel(),
                          targets=targets, grad_ckpt=c.grad_ckpt, attention=run.attention.backend.name,
                          linear_attention=linear[0] if linear else "triton", seq_len=mb["input_ids"].shape[1],
                          lora_r=c.lora_r, lora_targets=c.lora_targets, double_quant=c.double_quant,
                          aux_loss=aux_loss)


def kept_while(run_forward, persistent: dict) -> dict[int, int]:
    """The unique storages autograd saves in ``run_forward()`` and still holds when it returns (a part of
    the graph no output reaches is freed with what it saved), parameters' excluded: address -> bytes."""
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in persistent:
            saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        held = run_forward()  # its output holds the graph, as a step holds it until its backward
    kept = storage_bytes(t for ref in saved if (t := ref()) is not None)
    del held
    return kept


def saved_bytes(run, mb) -> tuple[int, int]:
    """(bytes of the unique storages autograd saves in one training forward, the load-balancing loss's
    included, and of the router logits each MoE layer keeps; parameters' excluded; targets)."""
    with torch.no_grad():  # kernels' one-time probes (which compute with autograd) run here, not measured
        run.loss_sum(mb)
    found = {}

    def forward():  # what a step holds until its backward: the loss, and the load-balancing loss
        found["loss"] = run.loss_sum(mb)
        return found["loss"], run.balance.after_forward(run.model, mb) if run.balance is not None else None

    saved = kept_while(forward, model_storages(run.model))
    kept = [m.routing.logits for m in run.model.modules() if isinstance(m, MoE)]
    return sum({**saved, **storage_bytes(kept)}.values()), found["loss"][1]


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


# -- mixtures of experts --------------------------------------------------------------------

MOE_FAMILIES = {  # make_hf_folder options (tests/conftest.py): 8 experts of 32, top 2
    "qwen3_moe": dict(config_class="Qwen3MoeConfig", num_experts=8, moe_intermediate_size=32, norm_topk_prob=True,
                      mlp_only_layers=[1], num_experts_per_tok=2, head_dim=16),  # q/k norms; layer 1 a dense MLP
    "gpt_oss": dict(config_class="GptOssConfig", num_local_experts=8, intermediate_size=32, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"], num_experts_per_tok=2,
                    head_dim=16),  # router and expert biases, clamped SwiGLU, sinks, q/k/v/o biases, YaRN
}


@pytest.fixture(scope="module")
def moe_folders(tmp_path_factory, make_hf_folder):
    folders = {}
    for family, options in MOE_FAMILIES.items():
        folders[family] = tmp_path_factory.mktemp(family)
        make_hf_folder(folders[family], **options)
    return folders


# gpt-oss's sinks have no bf16 attention kernel on the CPU: its bf16 experts are checked module by module below
MOE_RUNS = {"qwen3_moe lora fp32": ("qwen3_moe", dict(dtype="fp32", attention="chunked")),
            "qwen3_moe full fp32": ("qwen3_moe", dict(dtype="fp32", attention="chunked", full=True)),
            "qwen3_moe lora bf16": ("qwen3_moe", dict(dtype="bf16", attention="flash")),
            "qwen3_moe full bf16": ("qwen3_moe", dict(dtype="bf16", attention="flash", full=True)),
            "gpt_oss lora fp32": ("gpt_oss", dict(dtype="fp32", attention="chunked")),
            "gpt_oss full fp32": ("gpt_oss", dict(dtype="fp32", attention="chunked", full=True))}


@pytest.mark.parametrize("case", MOE_RUNS)
def test_a_built_moe_run_has_the_modelled_bytes(case, moe_folders, small_config, registry, quiet):
    """A tiny Qwen3-MoE-like and gpt-oss-like checkpoint, LoRA (experts included, the default targets) and
    full: parameters, gradients and optimizer state byte for byte, and the storages autograd saves
    (N·k rows through the experts, the load-balancing loss on, as the models' coefficients say)."""
    family, options = MOE_RUNS[case]
    run = build_run(small_config(model=str(moe_folders[family]), **options), registry, echo=quiet,
                    rows=one_document_rows())
    assert run.model.config.has_experts and run.balance is not None and run.balance.coef
    if not run.config.full:
        assert any(".experts.lora." in name for name, p in run.model.named_parameters() if p.requires_grad)
    check_run(run)


TRITON_CHILD = """
import sys, tempfile
sys.path.insert(0, ".")
from sftplug.config import TrainConfig
from sftplug.registry import build_registry
from sftplug.train.setup import build_run
from tests.train.test_memory import check_run, one_document_rows

config = TrainConfig(model=sys.argv[1], out=tempfile.mkdtemp(), steps=6, micro_bsz=2, seq_len=64, eval_data=None,
                     dtype="fp32", attention="triton", full=sys.argv[2] == "full")
run = build_run(config, build_registry(entrypoints=False), echo=lambda *a, **k: None, rows=one_document_rows())
assert run.attention.backend.name == "triton"
check_run(run)
"""


@pytest.mark.slow
def test_gpt_oss_with_the_triton_kernel_has_the_modelled_bytes(moe_folders, mode="lora"):
    """gpt-oss's attention on GPUs is sftplug's Triton kernel (sinks): its saved tensors (a copy for o's
    input, each row's ranges in a window's layers) as a built run keeps them, under the interpreter in fp32."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run([sys.executable, "-c", TRITON_CHILD, str(moe_folders["gpt_oss"]), mode], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]


def moe_setting(config, mode: str, dtype: str, tokens: int) -> memory.Setting:
    return memory.Setting(mode=mode, dtype=dtype, tokens=tokens, attention="flash" if dtype == "bf16" else "chunked")


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("mode, dtype", [("full", "fp32"), ("lora", "fp32"), ("full", "bf16"), ("lora", "bf16")])
def test_one_moe_feed_forward_saves_the_modelled_tensors(family, mode, dtype, moe_folders):
    """The experts' entries alone, in every precision (gpt-oss in bf16 too): one MoE feed-forward under
    autocast as the runs compute it (full: fp32 weights; LoRA: the base in the compute dtype, fp32 adapters),
    its input needing a gradient as a block's does."""
    base = torch.float32 if mode == "full" or dtype == "fp32" else torch.bfloat16
    model = load_model(str(moe_folders[family]), dtype=base, attention=None).model  # the experts alone
    if mode == "lora":
        model = apply_lora(model, 16, 32, 0.0, memory.Setting().lora_targets)
    layer = next(i for i, block in enumerate(model.layers) if isinstance(block.mlp, MoE))
    tokens = 37  # not a multiple of anything: N·k rows, some experts maybe without any
    x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(base)
    x.requires_grad_(True)
    persistent, saved = model_storages(model), {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in persistent:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.layers[layer].mlp(x).sum().backward()
    modelled = memory_experts.experts_saved(model.config, moe_setting(model.config, mode, dtype, tokens), layer)
    expected = sum(x.total(tokens) for x in modelled)
    if mode == "full" and dtype == "bf16":  # the router's and experts' bf16 weight copies (outside_saved counts them)
        tensors = memory_shapes.block_tensors(model.config, layer).items()
        expected += 2 * sum(n for name, n in tensors if name.startswith("mlp.") and not name.endswith("bias"))
    assert sum(saved.values()) == expected


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_blocks_have_the_models_parameters(family, moe_folders):
    """Each block's parameters by name and size, as memory_shapes counts them (norms apart)."""
    model = load_model(str(moe_folders[family]), dtype=torch.float32, attention=None).model
    config = model.config
    for i, block in enumerate(model.layers):
        params = {name: p.numel() for name, p in block.named_parameters()}
        norms = sorted(n for name, n in params.items() if "norm" in name)
        assert {k: v for k, v in params.items() if "norm" not in k} == memory_shapes.block_tensors(config, i)
        assert norms == sorted(memory_shapes.norm_sizes(config, i))
    assert sum(p.numel() for p in model.parameters()) == memory.model_params(config)


def test_the_moe_shapes_have_their_parameter_counts():
    """The published sizes of Qwen3-30B-A3B (30.5B) and gpt-oss-20b (20.9B), from their config.json."""
    counts = {name: memory.model_params(config) for name, config in memory.moe_shapes().items()}
    assert counts == {"Qwen3-30B-A3B": 30_532_122_624, "gpt-oss-20b": 20_914_757_184}


def test_what_the_moe_model_does_not_count_is_refused():
    config = memory.moe_shapes()["Qwen3-30B-A3B"]
    with pytest.raises(SftplugError, match="^memory model: sftplug refuses --quantize nf4 on a mixture of experts"):
        memory.estimate(config, mode="nf4")
    shared = dataclasses.replace(config, experts=dataclasses.replace(config.experts, shared_size=64))
    with pytest.raises(SftplugError, match="^memory model: qwen3_moe's shared expert is not modelled yet"):
        memory.estimate(shared)


def test_gemma4_is_refused_until_modelled():
    from transformers import Gemma4TextConfig

    from sftplug.hf.config import config_from_hf

    config = config_from_hf(Gemma4TextConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                                             hidden_size_per_layer_input=8).to_dict())
    with pytest.raises(SftplugError, match="^memory model: gemma4_text's per-layer inputs, .* not modelled yet$"):
        memory.estimate(config)


# -- hybrids: Gated DeltaNet layers beside gated attention ------------------------------------

# make_hf_folder options: layers 0-2 Gated DeltaNet, layer 3 gated attention; head dims the Triton kernel takes
HYBRID = dict(config_class="Qwen3_5TextConfig", num_hidden_layers=4, head_dim=16, linear_num_key_heads=2,
              linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)


@pytest.fixture(scope="module")
def hybrid_folder(tmp_path_factory, make_hf_folder):
    folder = tmp_path_factory.mktemp("qwen3_5")
    make_hf_folder(folder, **HYBRID)
    return folder


def test_hybrid_blocks_have_the_models_parameters(hybrid_folder):
    """Each block's parameters by name and size as memory_shapes counts them: the linear layers' projections,
    convolution, A_log and dt_bias, the attention layer's q projection twice as wide (its output gates)."""
    model = load_model(str(hybrid_folder), dtype=torch.float32, attention=None).model
    config = model.config
    for i, block in enumerate(model.layers):
        params = {name: p.numel() for name, p in block.named_parameters()}
        assert {k: v for k, v in params.items() if "norm" not in k} == memory_shapes.block_tensors(config, i)
        assert sorted(n for name, n in params.items() if "norm" in name) == sorted(memory_shapes.norm_sizes(config, i))
    assert sum(p.numel() for p in model.parameters()) == memory.model_params(config)


def test_the_hybrid_shapes_have_transformers_parameter_counts():
    """Qwen3.5-4B and -9B's language models: as many parameters as transformers builds from the same config."""
    transformers = pytest.importorskip("transformers")
    for name, hf in memory_models.HYBRID_CONFIG_JSON.items():
        config = transformers.Qwen3_5TextConfig(**{k: v for k, v in hf.items() if k != "model_type"})
        with torch.device("meta"):
            reference = transformers.AutoModelForCausalLM.from_config(config)
        assert memory.model_params(memory.hybrid_shapes()[name]) == sum(p.numel() for p in reference.parameters())


# the CPU's kernels: chunked attention in fp32, SDPA's flash kernel in bf16; the gated delta rule's PyTorch form
HYBRID_RUNS = {"lora fp32": dict(dtype="fp32", attention="chunked"),
               "lora bf16": dict(dtype="bf16", attention="flash"),
               "full bf16": dict(dtype="bf16", attention="flash", full=True)}


@pytest.mark.parametrize("case", HYBRID_RUNS)
def test_a_built_hybrid_run_has_the_modelled_bytes(case, hybrid_folder, small_config, registry, quiet):
    """Rows of 100 tokens: two chunks of the gated delta rule, the second padded. Parameters, gradients and
    optimizer state byte for byte, and the storages autograd keeps: the chunks' matrices, the state entering
    each chunk, the bf16 copies autocast makes, the gated attention's and the (1 + w) norms' tensors."""
    config = small_config(model=str(hybrid_folder), seq_len=100, linear_attention="pytorch", **HYBRID_RUNS[case])
    run = build_run(config, registry, echo=quiet, rows=one_document_rows(t=100))
    check_run(run)


TRITON_HYBRID_CHILD = """
import sys, tempfile
sys.path.insert(0, ".")
from sftplug.config import TrainConfig
from sftplug.registry import build_registry
from sftplug.train.setup import build_run
from sftplug.train import memory
from tests.train.test_memory import check_triton_mixer_at_half_precision, one_document_rows, saved_bytes, setting_of

config = TrainConfig(model=sys.argv[1], out=tempfile.mkdtemp(), steps=6, micro_bsz=2, seq_len=100, eval_data=None,
                     dtype="fp32", attention="triton", linear_attention="triton")
run = build_run(config, build_registry(entrypoints=False), echo=lambda *a, **k: None, rows=one_document_rows(t=100))
mb = run.batches.next()
saved, targets = saved_bytes(run, mb)
assert saved == memory.estimate(run.model.config, setting_of(run, mb, targets)).activations
for mode in ("lora", "full"):
    check_triton_mixer_at_half_precision(run.model.config, mode)
"""


def check_triton_mixer_at_half_precision(config, mode: str):
    """One Gated DeltaNet mixer with the Triton kernel under fp16 autocast, which keeps what bf16 autocast keeps
    at the same sizes (the interpreter computes bf16 wrongly): its storages against the model's bf16 entries."""
    from sftplug.model.transformer import Transformer
    from sftplug.plugins.linear_attention import TritonChunked
    from sftplug.train.memory_hybrid import linear_attention_saved

    setting = memory.Setting(mode=mode, dtype="bf16", tokens=200, seq_len=100, linear_attention="triton")
    base = torch.float32 if mode == "full" else torch.float16
    model = Transformer(config).to(base)
    if mode == "lora":
        model = apply_lora(model, 16, 32, 0.0, setting.lora_targets)
    mixer = model.layers[0].attn
    mixer.backend = TritonChunked()
    leaf = torch.randn(2, 100, config.hidden_size, generator=torch.Generator().manual_seed(0)).to(base)
    with torch.autocast("cpu", dtype=torch.float16):
        x = leaf.requires_grad_(True) * 1  # as the block's norm output: not a leaf, so autocast casts it per use
        kept = kept_while(lambda: mixer(x, None, None, None), model_storages(model))
    adapters = {name: n * 16 for name, (_, _, n) in memory_shapes.lora_shapes(config, setting.lora_targets, 0).items()}
    expected = sum(x.total(200) for x in linear_attention_saved(config, setting, adapters if mode == "lora" else {}))
    if mode == "full":  # the projections' bf16 weight copies (outside_saved counts them)
        expected += 2 * sum(i * o for i, o in memory_shapes.linear_attention_shapes(config).values())
    assert sum(kept.values()) == expected


@pytest.mark.slow
def test_a_hybrid_run_with_the_triton_kernel_has_the_modelled_bytes(hybrid_folder):
    """On GPUs the gated delta rule is sftplug's Triton kernel, which keeps only its inputs (backward
    recomputes the chunks' states), and attention sftplug's or flash: what a LoRA run with both Triton kernels
    saves under the interpreter in fp32 (the other parts of a run are the CPU runs' above), and one mixer at
    half precision, LoRA and full."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run([sys.executable, "-c", TRITON_HYBRID_CHILD, str(hybrid_folder)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]


def test_what_the_hybrid_model_does_not_count_is_refused():
    config = memory.hybrid_shapes()["Qwen3.5-9B"]
    with pytest.raises(SftplugError, match="^memory model: --quantize nf4 on Gated DeltaNet layers is not modelled "
                                           "yet; use lora or full$"):
        memory.estimate(config, mode="nf4")
    with pytest.raises(SftplugError, match="^memory model: 4096 tokens are not rows of seq_len 1000$"):
        memory.Setting(tokens=4096, seq_len=1000)
