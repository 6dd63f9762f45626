"""MXFP4 experts (gpt-oss checkpoints) against transformers' own dequantisation."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import sftplug.hf.mxfp4 as mxfp4
from sftplug.errors import SftplugError
from sftplug.hf.load import load_hf_folder
from sftplug.hf.mxfp4 import dequantize_mxfp4, dequantized_weights, mxfp4_tensor_names
from sftplug.hf.weights import SAFE_INDEX, open_weights, read_into
from sftplug.loading import load_model

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
INT_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
          torch.float64: torch.int64}
EXPERTS, HIDDEN, INTER = 3, 64, 96  # a gpt-oss layer in miniature: 32-value groups along both


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns: equal bits, NaNs and signed zeros included."""
    return t.contiguous().view(INT_OF[t.dtype])


def random_mxfp4(rows: int, columns: int, seed: int, full_range: bool = False):
    """blocks [E, rows, columns/32, 16] and scales [E, rows, columns/32]; ``full_range``: every e8m0
    exponent, 2^-127 to 2^128 (inf) included, else the ones a trained model has."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (EXPERTS, rows, columns // 32, 16), dtype=torch.uint8, generator=g)
    low, high = (0, 256) if full_range else (117, 131)
    scales = torch.randint(low, high, (EXPERTS, rows, columns // 32), dtype=torch.uint8, generator=g)
    return blocks, scales


def gpt_oss_layer(prefix: str, seed: int) -> dict[str, torch.Tensor]:
    """One layer's stored experts as gpt-oss checkpoints hold them (biases bf16, dense)."""
    gate_up_blocks, gate_up_scales = random_mxfp4(2 * INTER, HIDDEN, seed)
    down_blocks, down_scales = random_mxfp4(HIDDEN, INTER, seed + 1)
    return {
        f"{prefix}gate_up_proj_blocks": gate_up_blocks, f"{prefix}gate_up_proj_scales": gate_up_scales,
        f"{prefix}gate_up_proj_bias": torch.randn(EXPERTS, 2 * INTER).bfloat16(),
        f"{prefix}down_proj_blocks": down_blocks, f"{prefix}down_proj_scales": down_scales,
        f"{prefix}down_proj_bias": torch.randn(EXPERTS, HIDDEN).bfloat16(),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("full_range", [False, True], ids=["trained-range", "every-exponent"])
def test_dequantize_is_bitwise_transformers(dtype, full_range):
    blocks, scales = random_mxfp4(2 * INTER, HIDDEN, seed=0, full_range=full_range)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    got = dequantize_mxfp4(blocks, scales, dtype)
    assert got.shape == expected.shape == (EXPERTS, HIDDEN, 2 * INTER)  # gate_up_proj's [E, hidden, 2·inter]
    assert torch.equal(bits(got), bits(expected))


def test_chunks_do_not_change_the_values(monkeypatch):
    blocks, scales = random_mxfp4(HIDDEN, INTER, seed=1)
    whole = dequantize_mxfp4(blocks, scales, torch.bfloat16)
    monkeypatch.setattr(mxfp4, "CHUNK_BYTES", 5 * INTER * 2)  # 5 rows a chunk: 13 chunks an expert, the last short
    assert torch.equal(bits(dequantize_mxfp4(blocks, scales, torch.bfloat16)), bits(whole))


def test_the_stored_names():
    assert mxfp4_tensor_names("model.layers.3.mlp.experts.gate_up_proj") == (
        "model.layers.3.mlp.experts.gate_up_proj_blocks", "model.layers.3.mlp.experts.gate_up_proj_scales")


def write_checkpoint(folder, tensors: dict, shards: int) -> None:
    """model.safetensors, or ``shards`` files with an index, tensors dealt round-robin (a projection's
    blocks and scales land in different shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    parts = [{} for _ in names]
    for i, (key, t) in enumerate(tensors.items()):
        parts[i % shards][key] = t
    for name, part in zip(names, parts):
        save_file(part, str(folder / name))
    weight_map = {key: names[i % shards] for i, key in enumerate(tensors)}
    (folder / SAFE_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_a_gpt_oss_checkpoint_reads_as_transformers_dequantises_it(tmp_path, shards, dtype, monkeypatch):
    tensors = {"model.norm.weight": torch.randn(HIDDEN).bfloat16()}
    for layer in range(2):
        tensors.update(gpt_oss_layer(f"model.layers.{layer}.mlp.experts.", seed=10 * layer))
    write_checkpoint(tmp_path, tensors, shards)
    monkeypatch.setattr(mxfp4, "CHUNK_BYTES", 7 * HIDDEN * 4)  # several chunks an expert from the file
    weights = dequantized_weights(open_weights(tmp_path), {"quant_method": "mxfp4", "modules_to_not_convert": []})
    plain = {k for k in tensors if not k.endswith(("_blocks", "_scales"))}
    dense = {f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")}
    assert set(weights.entries) == plain | dense
    for name in sorted(dense):
        blocks, scales = (tensors[n] for n in mxfp4_tensor_names(name))
        expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        entry = weights.entries[name]
        assert entry.shape == tuple(expected.shape) and entry.dtype.is_floating_point
        dest = torch.full((expected.shape[0] * expected.shape[1], expected.shape[2]), float("nan"), dtype=dtype)
        read_into(entry, dest)  # as the loader reads it: into the flattened rows of the parameter
        assert torch.equal(bits(dest.view(expected.shape)), bits(expected)), name
    for name in sorted(plain):
        dest = torch.empty(tensors[name].shape, dtype=tensors[name].dtype)
        read_into(weights.entries[name], dest)
        assert torch.equal(dest, tensors[name])


def bad_pair(blocks_shape, scales_shape, scales_dtype=torch.uint8):
    return {"m.experts.down_proj_blocks": torch.zeros(blocks_shape, dtype=torch.uint8),
            "m.experts.down_proj_scales": torch.zeros(scales_shape, dtype=scales_dtype)}


@pytest.mark.parametrize("tensors", [
    bad_pair((2, 4, 3, 8), (2, 4, 3)),  # 16 values a group, not 32
    bad_pair((2, 4, 3, 16), (2, 4, 2)),  # a scale missing for a group
    bad_pair((4, 3, 16), (4, 3)),  # not stacked by expert
    bad_pair((2, 4, 3, 16), (2, 4, 3), torch.float32),  # scales not e8m0 bytes
], ids=["group-of-16", "scales-short", "not-stacked", "float-scales"])
def test_bad_shapes_are_refused_in_one_line(tmp_path, tensors):
    write_checkpoint(tmp_path, tensors, 1)
    with pytest.raises(SftplugError) as info:
        dequantized_weights(open_weights(tmp_path), {"quant_method": "mxfp4"})
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{tmp_path}: 'm.experts.down_proj_blocks' ")
    assert "are not MXFP4 blocks [experts, rows, groups, 16] and scales [experts, rows, groups], both uint8" in message
    with pytest.raises(SftplugError, match="are not MXFP4 blocks"):
        dequantize_mxfp4(*tensors.values(), torch.bfloat16)


@pytest.mark.parametrize("stored", ["m.experts.down_proj_blocks", "m.experts.down_proj_scales"])
def test_half_a_pair_is_refused_naming_the_other_half(tmp_path, stored):
    write_checkpoint(tmp_path, {stored: torch.zeros(2, 4, 3, 16, dtype=torch.uint8)}, 1)
    other = stored.replace("_blocks", "_x").replace("_scales", "_blocks").replace("_x", "_scales")
    with pytest.raises(SftplugError, match=rf"'{stored}' has no '{other}' \(not in model.safetensors\)"):
        dequantized_weights(open_weights(tmp_path), {"quant_method": "mxfp4"})


def test_other_quantizations_are_refused_in_one_line(tmp_path, make_hf_folder):
    make_hf_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SftplugError) as info:
        load_hf_folder(tmp_path)
    assert str(info.value) == (f"{tmp_path}: config.json's quantization_config (quant_method 'gptq') is not "
                               "supported; sftplug loads full-precision weights, and gpt-oss's mxfp4 experts")


def test_an_mxfp4_folder_without_packed_tensors_loads_and_is_no_longer_quantized(tmp_path, make_hf_folder):
    reference = make_hf_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_hf_folder(tmp_path)
    assert "quantization_config" not in loaded.model.config.extra  # an export writes a dense config.json
    assert torch.equal(loaded.model.norm.weight, reference.model.norm.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_gpt_oss_folder_loads_the_experts_transformers_loads(tmp_path, make_hf_folder, dtype):
    transformers = pytest.importorskip("transformers")
    make_hf_folder(tmp_path, config_class="GptOssConfig", head_dim=16, num_local_experts=EXPERTS,
                   num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    stored = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    for layer in range(2):  # the experts as a gpt-oss release stores them
        prefix = f"model.layers.{layer}.mlp.experts."
        del stored[f"{prefix}gate_up_proj"], stored[f"{prefix}down_proj"]
        stored.update({k: v for k, v in gpt_oss_layer(prefix, seed=layer).items() if not k.endswith("_bias")})
    write_checkpoint(tmp_path, stored, shards=2)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                     "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=dtype)
    ours = load_hf_folder(tmp_path, dtype=dtype).model
    for layer in range(2):
        for proj in ("gate_up_proj", "down_proj"):
            expected = getattr(reference.model.layers[layer].mlp.experts, proj)
            got = ours.get_parameter(f"layers.{layer}.mlp.experts.{proj}")
            assert got.dtype == expected.dtype == dtype
            assert torch.equal(bits(got), bits(expected)), (layer, proj)
    if dtype == torch.float32:  # and the model computes with them: logits as the house compares them (fp32)
        ids = torch.randint(0, 1024, (2, 20), generator=torch.Generator().manual_seed(2))
        model = load_model(str(tmp_path)).model  # auto: a backend that applies the sinks and windows
        with torch.no_grad():
            got, ref = model(ids), reference(ids).logits
        assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-4
