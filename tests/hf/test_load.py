"""The HF checkpoint loader: parity with transformers, shards, exact errors, PEFT names."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import sftplug
from sftplug.config import ASSETS
from sftplug.errors import SftplugError
from sftplug.hf import weights as weight_files
from sftplug.hf.config import config_from_hf
from sftplug.hf.load import empty_model, load_hf_folder, load_hf_weights
from sftplug.hf.names import load_state_dict_exact, map_names_to_model
from sftplug.hf.weights import open_weights
from sftplug.loading import load_model
from sftplug.model.lora import apply_lora
from sftplug.model.transformer import ModelConfig, Transformer, rope_inv_freq

transformers = pytest.importorskip("transformers")

LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # small, so every RoPE band (low, medium, high) is hit
}
CASES = {  # make_hf_folder options (tests/conftest.py)
    "llama": {},
    "llama-tied": {"tie_word_embeddings": True},
    "llama3.1": {"rope_scaling": LLAMA31_ROPE, "rope_theta": 500000.0},
    "mistral": {"config_class": "MistralConfig", "head_dim": 16},
    "qwen2-tied": {"config_class": "Qwen2Config", "tie_word_embeddings": True},  # q/k/v biases
    "qwen2": {"config_class": "Qwen2Config"},
}


def assert_close_logits(got, ref, tol=1e-4):
    assert got.shape == ref.shape
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel <= tol, f"max abs difference {rel:.2e} of the logits' scale"


@pytest.fixture(scope="module")
def llama(tmp_path_factory, make_hf_folder):
    folder = tmp_path_factory.mktemp("llama")
    return folder, make_hf_folder(folder)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case, make_hf_folder):
    reference = make_hf_folder(tmp_path, **CASES[case])
    model = sftplug.load_model(str(tmp_path))  # the public API
    assert model.layers[0].attn.backend is not None  # callable without choosing a backend
    ids = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(ids)
        ref = reference(ids).logits
    assert got.shape == (2, 40, 1024) and got.dtype == torch.float32
    assert_close_logits(got, ref)
    if "tied" in case:
        assert model.lm_head.weight is model.embed_tokens.weight


def test_loader_reports_itself_and_loads_in_another_dtype(llama):
    folder, _ = llama
    loaded = load_model(folder, dtype="bf16")
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.inv_freq.dtype == torch.float32  # RoPE frequencies stay exact
    assert loaded.info["format"] == "hf" and loaded.info["files"] == ["model.safetensors"]
    assert "llama" in loaded.description and loaded.tokenizer.vocab_size == 1024
    with torch.no_grad():
        assert loaded.model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 1024)


def test_source_dtype_by_default_and_exact_conversion_in_chunks(tmp_path, monkeypatch, make_hf_folder):
    reference = make_hf_folder(tmp_path / "fp32", **CASES["qwen2"])
    reference.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # config.json then says bfloat16
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / name, tmp_path / "bf16")
    monkeypatch.setattr(weight_files, "CHUNK_BYTES", 256)  # many chunks per tensor
    own = load_hf_folder(tmp_path / "bf16").model  # the source's dtype, read as is
    up = load_hf_folder(tmp_path / "bf16", dtype=torch.float32).model  # converted
    assert own.layers[0].attn.qkv.weight.dtype == torch.bfloat16 and up.norm.weight.dtype == torch.float32
    k = reference.model.layers[1].self_attn.k_proj.weight
    assert torch.equal(own.layers[1].attn.qkv.weight[64:96], k)
    assert torch.equal(up.layers[1].attn.qkv.weight[64:96], k.float())
    assert torch.equal(up.layers[1].attn.qkv.bias[64:96], reference.model.layers[1].self_attn.k_proj.bias.float())


def test_legacy_and_v5_rope_configs_agree():
    base = dict(model_type="llama", vocab_size=8, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    v4 = config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": LLAMA31_ROPE})
    v5 = config_from_hf({**base, "rope_parameters": {**LLAMA31_ROPE, "rope_theta": 500000.0}})
    assert v4.rotary.theta == v5.rotary.theta == 500000.0 and v4.rotary.scaling == v5.rotary.scaling
    assert torch.equal(rope_inv_freq(v4), rope_inv_freq(v5))
    with pytest.raises(SftplugError, match="rope type 'dynamic'"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}})
    with pytest.raises(SftplugError, match="model_type 'gpt2'"):
        config_from_hf({**base, "model_type": "gpt2"})


def _write_two_shards(src, dst):
    """q_proj of every layer in shard 1, k/v (and the rest) in shard 2, plus the index."""
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst)
    tensors = load_file(str(src / "model.safetensors"))
    first = {k: v for k, v in tensors.items() if "q_proj" in k or "embed" in k}
    second = {k: v for k, v in tensors.items() if k not in first}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, shard in zip(names, (first, second)):
        save_file(shard, str(dst / name), {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return names


def test_two_shard_checkpoint_loads(llama, tmp_path):
    folder, reference = llama
    names = _write_two_shards(folder, tmp_path / "sharded")
    loaded = load_model(tmp_path / "sharded")
    assert loaded.info["files"] == names
    ids = torch.randint(0, 1024, (1, 17))
    with torch.no_grad():
        assert_close_logits(loaded.model(ids), reference(ids).logits)


def test_missing_shard_and_lying_index_are_errors(llama, tmp_path):
    folder, _ = llama
    names = _write_two_shards(folder, tmp_path / "a")
    (tmp_path / "a" / names[1]).unlink()
    with pytest.raises(SftplugError, match=f"lists the shard {names[1]}, which is missing"):
        load_hf_folder(tmp_path / "a")
    _write_two_shards(folder, tmp_path / "b")
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = names[0]
    (tmp_path / "b" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SftplugError, match=f"'model.norm.weight' is in {names[0]}, but"):
        load_hf_folder(tmp_path / "b")


def _rewrite(src, dst, change):
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), {"format": "pt"})
    return dst


def test_renamed_key_names_it_the_file_and_the_closest_name(llama, tmp_path):
    good = "model.layers.0.self_attn.q_proj.weight"
    bad = "model.layers.0.self_attn.q_prj.weight"
    folder = _rewrite(llama[0], tmp_path / "x", lambda t: t.__setitem__(bad, t.pop(good)))
    with pytest.raises(SftplugError) as info:
        sftplug.load_model(str(folder))
    message = str(info.value)
    assert "\n" not in message
    assert f"1 unexpected tensor '{bad}' in model.safetensors (closest expected name for '{bad}': '{good}')" in message
    assert f"1 missing tensor '{good}' (not in model.safetensors) (closest name found: '{bad}')" in message


def test_missing_layer_is_named(llama, tmp_path):
    def drop_layer_1(tensors):
        for key in [k for k in tensors if k.startswith("model.layers.1.")]:
            del tensors[key]

    folder = _rewrite(llama[0], tmp_path / "x", drop_layer_1)
    with pytest.raises(SftplugError) as info:
        load_hf_folder(folder)
    message = str(info.value)
    assert "9 missing tensors 'model.layers.1.input_layernorm.weight'" in message and "and 6 more" in message
    assert "layer 1 entirely missing; config.json says num_hidden_layers=2" in message


def test_wrong_shape_is_named(llama, tmp_path):
    key = "model.layers.1.self_attn.k_proj.weight"
    folder = _rewrite(llama[0], tmp_path / "x", lambda t: t.__setitem__(key, torch.zeros(48, 64)))
    with pytest.raises(SftplugError, match=rf"'{key}' in model.safetensors has shape \[48, 64\], expected \[32, 64\]"):
        load_hf_folder(folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_is_an_error(llama, tmp_path, damage):
    folder = shutil.copytree(llama[0], tmp_path / "x")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 64 + data[64:])
    with pytest.raises(SftplugError, match=f"{path}: not a valid safetensors file .*corrupt or truncated"):
        sftplug.load_model(str(folder))


def test_pickle_bin_is_refused_unless_opted_in(llama, tmp_path, monkeypatch):
    folder, reference = llama
    dst = tmp_path / "bin"
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, dst)
    torch.save(load_file(str(folder / "model.safetensors")), dst / "pytorch_model.bin")
    monkeypatch.delenv("SFTPLUG_ALLOW_BIN", raising=False)
    with pytest.raises(SftplugError, match="pickle files .*arbitrary code.*SFTPLUG_ALLOW_BIN=1"):
        load_hf_folder(dst)
    monkeypatch.setenv("SFTPLUG_ALLOW_BIN", "1")
    ids = torch.randint(0, 1024, (1, 9))
    with torch.no_grad():
        assert_close_logits(load_model(dst).model(ids), reference(ids).logits)


def test_folders_that_are_not_hf_checkpoints(llama, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SftplugError, match="not a built-in preset, an HF checkpoint folder or an sftplug"):
        sftplug.load_model(str(tmp_path / "empty"))
    no_config = shutil.copytree(llama[0], tmp_path / "no-config")
    (no_config / "config.json").unlink()
    with pytest.raises(SftplugError, match="has weights but no config.json"):
        sftplug.load_model(str(no_config))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(llama[0] / "config.json", no_weights)
    with pytest.raises(SftplugError, match="no weights"):
        sftplug.load_model(str(no_weights))


def test_tokenizer_larger_than_the_vocabulary_is_an_error(tmp_path, make_hf_folder):
    make_hf_folder(tmp_path, vocab_size=128)
    with pytest.raises(SftplugError, match="tokenizer.json has 1024 tokens but config.json vocab_size is 128"):
        load_hf_folder(tmp_path)


# -- PEFT names -------------------------------------------------------------------------


def _tiny_model(seed=0):
    model = Transformer(ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=48, n_layers=1))
    model.init_weights(seed)
    return model


def test_map_names_plain_to_wrapped_and_back():
    plain, wrapped = _tiny_model(), apply_lora(_tiny_model(), 4, 8, 0.0, ["qkv", "gate_up"])
    keys = ["layers.0.attn.qkv.weight", "layers.0.attn.o.weight", "layers.0.mlp.gate_up.weight", "norm.weight"]
    assert map_names_to_model(keys, wrapped) == {
        "layers.0.attn.qkv.weight": "layers.0.attn.qkv.base_layer.weight",
        "layers.0.attn.o.weight": "layers.0.attn.o.weight",  # not wrapped: unchanged
        "layers.0.mlp.gate_up.weight": "layers.0.mlp.gate_up.base_layer.weight",
        "norm.weight": "norm.weight",
    }
    back = ["layers.0.attn.qkv.base_layer.weight", "layers.0.attn.qkv.lora_A.default.weight", "nope.weight"]
    assert map_names_to_model(back, plain) == {
        "layers.0.attn.qkv.base_layer.weight": "layers.0.attn.qkv.weight",
        "layers.0.attn.qkv.lora_A.default.weight": None,
        "nope.weight": None,
    }


def test_load_state_dict_exact_both_ways():
    source = _tiny_model(seed=1)
    wrapped = apply_lora(_tiny_model(seed=2), 4, 8, 0.0, ["qkv", "o", "gate_up", "down"])
    base_names = [n for n in wrapped.state_dict() if ".lora_" not in n]
    load_state_dict_exact(wrapped, source.state_dict(), "plain.safetensors", expected=base_names)
    assert torch.equal(wrapped.layers[0].attn.qkv.base_layer.weight, source.layers[0].attn.qkv.weight)

    plain = _tiny_model(seed=3)
    saved = {k: v for k, v in wrapped.state_dict().items() if ".lora_" not in k}  # as a wrapped model saves it
    load_state_dict_exact(plain, saved, "wrapped.safetensors")
    assert torch.equal(plain.layers[0].mlp.down.weight, source.layers[0].mlp.down.weight)

    broken = dict(saved)
    broken["layers.0.attn.qkv.base_layr.weight"] = broken.pop("layers.0.attn.qkv.base_layer.weight")
    with pytest.raises(SftplugError) as info:
        load_state_dict_exact(plain, broken, "wrapped.safetensors")
    assert "'layers.0.attn.qkv.base_layr.weight' in wrapped.safetensors" in str(info.value)
    assert "closest expected name for 'layers.0.attn.qkv.base_layr.weight': 'layers.0.attn.qkv.weight'" in str(
        info.value
    )
    assert "1 missing tensor 'layers.0.attn.qkv.weight'" in str(info.value)


def test_hf_weights_load_into_a_peft_wrapped_model(llama):
    folder, reference = llama
    config = load_hf_folder(folder).model.config
    model = apply_lora(empty_model(config, torch.float32, torch.device("cpu")), 4, 8, 0.0, ["qkv", "gate_up"])
    load_hf_weights(model, open_weights(folder))
    q_rows = config.n_heads * config.head_dim
    assert torch.equal(
        model.layers[0].attn.qkv.base_layer.weight[:q_rows],
        reference.model.layers[0].self_attn.q_proj.weight,
    )
    assert torch.equal(model.layers[1].mlp.gate_up.base_layer.weight[96:], reference.model.layers[1].mlp.up_proj.weight)


def test_a_parameter_without_an_hf_name_is_never_left_uninitialized(llama):
    folder, _ = llama
    model = empty_model(load_hf_folder(folder).model.config, torch.float32, torch.device("cpu"))
    model.layers[0].attn.o.register_parameter("bias", torch.nn.Parameter(torch.empty(64)))
    with pytest.raises(SftplugError, match=r"\['layers.0.attn.o.bias'\]: no HF name"):
        load_hf_weights(model, open_weights(folder))
