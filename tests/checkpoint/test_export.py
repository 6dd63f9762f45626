"""Export to HF format: merged models and PEFT adapters that transformers and peft load exactly."""

import json
import os
import stat
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from sftplug.checkpoint import folders
from sftplug.checkpoint.export import export_checkpoint
from sftplug.config import TrainConfig
from sftplug.errors import SftplugError
from sftplug.loading import load_model
from sftplug.train.loop import train

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.randint(0, 1024, (2, 33), generator=torch.Generator().manual_seed(3))


def relative_error(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def sftplug_logits(source):
    model = load_model(str(source)).model
    with torch.no_grad():
        return model(IDS)


def hf_logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager")


def train_lora(registry, quiet, model, out, targets=("qkv", "o", "gate_up", "down")):
    config = TrainConfig(
        model=str(model), out=str(out), steps=3, micro_bsz=2, seq_len=64, eval_data=None, lr=1e-2, warmup=0,
        log_every=100, lora_targets=targets,
    )  # fmt: skip
    folder = train(config, registry, echo=quiet)["checkpoint"]
    # Training moves B off zero; perturb every B as well so no LoRA (lm_head included) is trivial,
    # within its diagonal blocks (the entries a PEFT adapter has).
    path = folders.resolve(folder) / folders.WEIGHTS
    weights = load_file(str(path))
    generator = torch.Generator().manual_seed(0)
    for name, t in weights.items():
        if ".lora_B." in name:
            weights[name] = t + 0.05 * torch.randn(t.shape, generator=generator) * (t != 0)
    save_file(weights, str(path))  # same names and shapes: the manifest's sizes still hold
    return folder


@pytest.mark.parametrize(
    "config_class, overrides, targets",
    [
        ("LlamaConfig", {}, ("qkv", "o", "gate_up", "down")),
        ("Qwen2Config", {"tie_word_embeddings": True}, ("qkv", "o", "gate_up", "down", "lm_head")),
    ],
    ids=["llama", "qwen2-tied-lm_head"],
)
def test_lora_run_exports_merged_and_as_adapter(tmp_path, config_class, overrides, targets, make_hf_folder,
                                                registry, quiet):
    base = tmp_path / "hf"
    make_hf_folder(base, config_class, **overrides)
    run = train_lora(registry, quiet, base, tmp_path / "run", targets)
    ours = sftplug_logits(tmp_path / "run")
    assert relative_error(ours, hf_logits(hf_model(base))) > 1e-2  # the LoRA changes the model

    merged = export_checkpoint(tmp_path / "run", tmp_path / "merged", merge=True)
    assert merged == {"model": tmp_path / "merged"}
    assert relative_error(hf_logits(hf_model(tmp_path / "merged")), ours) <= 1e-4
    assert relative_error(sftplug_logits(tmp_path / "merged"), ours) <= 1e-4  # and sftplug reads it back

    parts = export_checkpoint(run, tmp_path / "split", merge=False)
    assert parts == {"base": tmp_path / "split" / "base", "adapter": tmp_path / "split" / "adapter"}
    adapter_config = json.loads((parts["adapter"] / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 16
    assert {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} <= set(adapter_config["target_modules"])
    # in one order whatever the process's string hashing (PEFT writes its set as it iterates)
    assert adapter_config["target_modules"] == sorted(adapter_config["target_modules"])
    adapter = load_file(str(parts["adapter"] / "adapter_model.safetensors"))
    a = "base_model.model.model.layers.0.self_attn.{}_proj.lora_A.weight"
    assert adapter[a.format("q")].shape == adapter[a.format("v")].shape == (16, 64)
    assert not torch.equal(adapter[a.format("q")], adapter[a.format("v")])  # an A per projection, as PEFT's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that a LoRA on a tied lm_head complicates merging
        wrapped = peft.PeftModel.from_pretrained(hf_model(parts["base"]), str(parts["adapter"]))
    assert relative_error(hf_logits(wrapped), ours) <= 1e-4
    assert relative_error(hf_logits(hf_model(parts["base"])), hf_logits(hf_model(base))) <= 1e-4


def test_full_fine_tune_exports_as_one_model(tmp_path, make_hf_folder, registry, quiet):
    base = tmp_path / "hf"
    make_hf_folder(base, "MistralConfig", head_dim=16)
    config = TrainConfig(
        model=str(base), out=str(tmp_path / "run"), steps=2, micro_bsz=2, seq_len=64, eval_data=None, lr=1e-2,
        warmup=0, full=True, log_every=100,
    )  # fmt: skip
    train(config, registry, echo=quiet)
    ours = sftplug_logits(tmp_path / "run")
    assert relative_error(ours, hf_logits(hf_model(base))) > 1e-3  # the weights changed
    out = export_checkpoint(tmp_path / "run", tmp_path / "out", merge=False)["model"]  # no LoRA: one model
    exported = json.loads((out / "config.json").read_text())
    assert exported["architectures"] == ["MistralForCausalLM"] and exported["model_type"] == "mistral"
    assert relative_error(hf_logits(hf_model(out)), ours) <= 1e-4


def test_export_writes_the_chat_template_once_where_transformers_5_reads_it(tmp_path, make_hf_folder):
    base = tmp_path / "hf"
    make_hf_folder(base)
    hf = transformers.AutoTokenizer.from_pretrained(str(base))
    hf.chat_template = {"default": hf.chat_template, "tool_use": "{{ 'tools' }}"}
    hf.save_pretrained(str(base))  # chat_template.jinja and additional_chat_templates/tool_use.jinja
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ 'stale' }}"}))
    (base / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'processor' }}"}))
    tokenizer = load_model(str(base)).tokenizer
    assert tokenizer.template_source == "chat_template.jinja"

    out = export_checkpoint(base, tmp_path / "out")["model"]
    assert (out / "chat_template.jinja").read_text() == tokenizer.chat_template  # the template sftplug renders
    assert not (out / "additional_chat_templates").exists() and not (out / "chat_template.json").exists()
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    chat = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    exported = transformers.AutoTokenizer.from_pretrained(str(out))
    assert exported.apply_chat_template(chat, tokenize=False) == tokenizer.render(chat)
    assert exported.apply_chat_template(chat, tools=[], tokenize=False) == tokenizer.render(chat)  # no tool_use


def test_tiny_preset_exports_with_its_tokenizer(tmp_path):
    out = export_checkpoint("tiny", tmp_path / "tiny", max_shard_bytes=2 * 2**20)["model"]
    assert (out / "model.safetensors.index.json").is_file()  # ~8 MB of weights in 2 MB shards
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    assert relative_error(hf_logits(hf_model(out)), sftplug_logits("tiny")) <= 1e-4
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = load_model("tiny").tokenizer
    text = "<|user|>\nWrite the word truck 3 times."
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ours.encode(text)

    half = export_checkpoint("tiny", tmp_path / "tiny-bf16", dtype="bf16")["model"]
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"
    weights = load_file(str(half / "model.safetensors"))
    assert weights["model.layers.0.self_attn.k_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(
        load_model(str(half)).model.layers[0].attn.qkv.weight,
        load_model("tiny").model.layers[0].attn.qkv.weight.bfloat16(),
    )


def test_lora_on_the_tiny_preset_exports_base_and_adapter(tmp_path, registry, quiet):
    config = TrainConfig(
        out=str(tmp_path / "run"), steps=1, micro_bsz=1, seq_len=64, eval_data=None, warmup=0, log_every=100,
        lora_targets=("qkv", "down"),
    )  # fmt: skip
    train(config, registry, echo=quiet)
    parts = export_checkpoint(tmp_path / "run", tmp_path / "out", merge=False)
    assert sorted(json.loads((parts["adapter"] / "adapter_config.json").read_text())["target_modules"]) == [
        "down_proj", "k_proj", "q_proj", "v_proj",
    ]  # fmt: skip
    wrapped = peft.PeftModel.from_pretrained(hf_model(parts["base"]), str(parts["adapter"]))
    assert relative_error(hf_logits(wrapped), sftplug_logits(tmp_path / "run")) <= 1e-4


def test_every_exported_file_has_the_mode_a_new_file_gets(tmp_path, registry, quiet):
    # safetensors leaves 0600 and a copy keeps its source's mode; an export is one set of plain files
    config = TrainConfig(out=str(tmp_path / "run"), steps=1, micro_bsz=1, seq_len=64, eval_data=None, warmup=0,
                         log_every=100)
    train(config, registry, echo=quiet)
    previous = os.umask(0o027)  # not the usual 022: the modes must follow the umask, not be a fixed 0644
    try:
        merged = export_checkpoint(tmp_path / "run", tmp_path / "merged")["model"]
        split = export_checkpoint(tmp_path / "run", tmp_path / "split", merge=False)["base"].parent
    finally:
        os.umask(previous)
    files = [p for p in [*merged.rglob("*"), *split.rglob("*")] if p.is_file()]
    names = {p.name for p in files}
    assert {"model.safetensors", "config.json", "tokenizer.json", "adapter_model.safetensors"} <= names
    modes = {p.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert modes == dict.fromkeys(modes, oct(0o640))

def test_bad_inputs_are_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SftplugError, match="not a built-in preset, an HF checkpoint folder or an sftplug"):
        export_checkpoint(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(SftplugError):
        export_checkpoint(tmp_path / "does-not-exist", tmp_path / "out")

    fake = tmp_path / "fake" / "checkpoints" / "step-1"
    fake.mkdir(parents=True)
    manifest = {"format": "sftplug-checkpoint", "files": {"model.safetensors": 10}}
    (fake / "run.json").write_text(json.dumps(manifest))
    (fake.parent / "latest").write_text("step-1\n")
    with pytest.raises(SftplugError, match="incomplete checkpoint .model.safetensors is missing"):
        export_checkpoint(tmp_path / "fake", tmp_path / "out")
    (fake / "model.safetensors").write_bytes(b"0123456789")
    with pytest.raises(SftplugError, match="names no base_model"):
        export_checkpoint(tmp_path / "fake", tmp_path / "out")
    manifest.update(step=1, base_model="tiny", lora=None)
    (fake / "run.json").write_text(json.dumps(manifest))
    # model.safetensors has the listed size, but is not safetensors
    with pytest.raises(SftplugError, match=f"{fake / 'model.safetensors'}: cannot be read"):
        export_checkpoint(tmp_path / "fake", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written

    with pytest.raises(SftplugError, match="dtype 'int8' is not supported"):
        export_checkpoint("tiny", tmp_path / "out", dtype="int8")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(SftplugError, match="already exists and is not an empty folder"):
        export_checkpoint("tiny", tmp_path / "taken")


def test_an_earlier_runs_shared_a_lora_loads_and_exports_exactly_but_does_not_resume(tmp_path, registry, quiet):
    """Checkpoints of earlier sftplug runs hold one A of r rows shared by q/k/v and B over all rows."""
    config = TrainConfig(
        out=str(tmp_path / "run"), steps=1, micro_bsz=1, seq_len=64, eval_data=None, warmup=0, log_every=100,
        lora_targets=("qkv", "down"), lora_r=4,
    )  # fmt: skip
    step = folders.resolve(train(config, registry, echo=quiet)["checkpoint"])
    weights = load_file(str(step / folders.WEIGHTS))
    generator = torch.Generator().manual_seed(1)
    deltas = {}
    for layer in range(load_model("tiny").model.config.n_layers):
        name = f"layers.{layer}.attn.qkv"
        b = weights[f"{name}.lora_B.default.weight"]
        a_old = 0.1 * torch.randn(4, weights[f"{name}.lora_A.default.weight"].shape[1], generator=generator)
        b_old = 0.05 * torch.randn(b.shape[0], 4, generator=generator)
        weights[f"{name}.lora_A.default.weight"], weights[f"{name}.lora_B.default.weight"] = a_old, b_old
        deltas[f"{name}.weight"] = (32 / 4) * b_old @ a_old
        down = f"layers.{layer}.mlp.down"
        deltas[f"{down}.weight"] = (32 / 4) * weights[f"{down}.lora_B.default.weight"] @ weights[
            f"{down}.lora_A.default.weight"]
    save_file(weights, str(step / folders.WEIGHTS))
    manifest = json.loads((step / folders.MANIFEST).read_text())
    manifest["lora"] = {"r": 4, "alpha": 32.0, "dropout": 0.0, "targets": ["down", "qkv"]}  # as earlier runs saved
    manifest["files"][folders.WEIGHTS] = (step / folders.WEIGHTS).stat().st_size
    (step / folders.MANIFEST).write_text(json.dumps(manifest))

    reference = load_model("tiny").model
    with torch.no_grad():
        for name, delta in deltas.items():
            reference.get_parameter(name).add_(delta)
        expected = reference(IDS)
    assert relative_error(sftplug_logits(tmp_path / "run"), expected) <= 1e-5
    parts = export_checkpoint(tmp_path / "run", tmp_path / "out", merge=False)
    wrapped = peft.PeftModel.from_pretrained(hf_model(parts["base"]), str(parts["adapter"]))
    assert relative_error(hf_logits(wrapped), expected) <= 1e-4

    resumed = TrainConfig(**{**config.to_dict(), "steps": 2, "resume": "auto"})
    with pytest.raises(SftplugError, match="earlier sftplug whose LoRA shares one A .* continue with --adapter"):
        train(resumed, registry, echo=quiet)
