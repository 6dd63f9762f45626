"""Exports of a LoRA on a mixture's experts: the PEFT adapter loads with PeftModel.from_pretrained
and the merged folder with transformers, each with sftplug's logits; a PEFT-trained target_parameters
adapter continues under ``--adapter`` with PEFT's logits; what sftplug cannot represent is refused."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from sftplug.checkpoint import folders
from sftplug.checkpoint.export import export_checkpoint
from sftplug.config import TrainConfig
from sftplug.errors import SftplugError
from sftplug.hf.peft_adapter import load_peft_adapter
from sftplug.loading import load_model
from sftplug.train.loop import train

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.randint(0, 1024, (2, 33), generator=torch.Generator().manual_seed(3))
EXPERTS = dict(num_experts_per_tok=2, head_dim=16)
CASES = {  # make_hf_folder options (tests/conftest.py): 8 experts of 32, top 2
    "qwen2_moe": dict(config_class="Qwen2MoeConfig", num_experts=8, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, **EXPERTS),  # experts saved one by one, a shared expert
    "mixtral": dict(config_class="MixtralConfig", num_local_experts=8, intermediate_size=32, sliding_window=16,
                    **EXPERTS),  # its files say block_sparse_moe.experts.{e}.w1, PEFT's names mlp.experts
    "gpt_oss": dict(config_class="GptOssConfig", num_local_experts=8, intermediate_size=32, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"], **EXPERTS),  # experts stored [E, in, out]
}


def relative_error(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()


def logits(model):
    with torch.no_grad():
        out = model.eval()(IDS)
    return getattr(out, "logits", out)


def trained_run(folder, out, registry, quiet):
    """Three LoRA updates with the default targets (the experts' included), every B then moved further off zero."""
    config = TrainConfig(model=str(folder), out=str(out), steps=3, micro_bsz=2, seq_len=64, eval_data=None, lr=1e-2,
                         warmup=0, log_every=100, lora_r=4)
    path = folders.resolve(train(config, registry, echo=quiet)["checkpoint"]) / folders.WEIGHTS
    weights = load_file(str(path))
    generator = torch.Generator().manual_seed(0)
    for name, t in weights.items():
        if re.search(r"(\.lora_B\.|\.lora\.\w+\.B$)", name):  # PEFT's linear B (its diagonal blocks), the experts' B
            weights[name] = t + 0.05 * torch.randn(t.shape, generator=generator) * (t != 0 if ".lora_B." in name else 1)
    save_file(weights, str(path))
    return weights


@pytest.mark.parametrize("family", list(CASES))
def test_exports_load_in_transformers_and_peft_with_sftplug_s_logits(tmp_path, family, make_hf_folder, registry,
                                                                     quiet):
    make_hf_folder(tmp_path / "hf", **CASES[family])
    weights = trained_run(tmp_path / "hf", tmp_path / "run", registry, quiet)
    assert any(".experts.lora.gate_up_proj.B" in name for name in weights)
    ours = logits(load_model(str(tmp_path / "run"), dtype=torch.float32).model)
    base = logits(hf_model(tmp_path / "hf"))
    assert relative_error(ours, base) > 1e-3  # the adapters change the logits

    parts = export_checkpoint(tmp_path / "run", tmp_path / "adapter", merge=False)
    config = json.loads((parts["adapter"] / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    continued = peft.PeftModel.from_pretrained(hf_model(parts["base"]), str(parts["adapter"]))
    assert relative_error(logits(continued), ours) <= 1e-5  # fp32, one forward: rounding of its order only

    merged = export_checkpoint(tmp_path / "run", tmp_path / "merged")["model"]
    assert relative_error(logits(hf_model(merged)), ours) <= 1e-5


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_a_peft_trained_experts_adapter_continues_under_adapter(tmp_path, family, make_hf_folder, registry, quiet):
    make_hf_folder(tmp_path / "hf", **CASES[family])
    theirs = peft.get_peft_model(hf_model(tmp_path / "hf"), peft.LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)
    theirs.save_pretrained(str(tmp_path / "adapter"))
    model = load_model(str(tmp_path / "hf"), dtype=torch.float32).model
    model.requires_grad_(False)
    ours = load_peft_adapter(model, tmp_path / "adapter")
    assert ours.lora_spec.targets == ("q_proj", "v_proj", "experts.gate_up_proj", "experts.down_proj")
    assert relative_error(logits(ours), logits(theirs)) <= 1e-5

    lines = []
    config = TrainConfig(model=str(tmp_path / "hf"), adapter=str(tmp_path / "adapter"), out=str(tmp_path / "run"),
                         steps=1, micro_bsz=1, seq_len=32, eval_data=None, log_every=100, lr=1e-2)
    train(config, registry, echo=lambda *a: lines.append(" ".join(map(str, a))))
    header = next(line for line in lines if line.startswith("model:"))
    printed = int(re.search(r"([\d,]+) trainable params as PEFT counts them", header).group(1).replace(",", ""))
    assert printed == theirs.num_parameters(only_trainable=True)
    parts = export_checkpoint(tmp_path / "run", tmp_path / "export", merge=False)
    continued = peft.PeftModel.from_pretrained(hf_model(parts["base"]), str(parts["adapter"]))
    trained = logits(load_model(str(tmp_path / "run"), dtype=torch.float32).model)
    assert relative_error(logits(continued), trained) <= 1e-5
    assert relative_error(trained, logits(theirs)) > 1e-4  # the update changed the adapter


def write_adapter(folder, config: dict, tensors: dict) -> None:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def test_what_a_target_parameters_adapter_cannot_be_is_refused(tmp_path, make_hf_folder, hf_folder):
    make_hf_folder(tmp_path / "hf", **CASES["gpt_oss"])
    model = load_model(str(tmp_path / "hf"), dtype=torch.float32).model
    a = torch.zeros(8 * 2, 64)
    write_adapter(tmp_path / "router", {"target_parameters": ["mlp.router.weight"]},
                  {"base_model.model.model.layers.0.mlp.router.lora_A.weight": a})
    with pytest.raises(SftplugError, match=r"'target_parameters' names 'mlp.router.weight'; sftplug's LoRA on"):
        load_peft_adapter(model, tmp_path / "router")
    write_adapter(tmp_path / "half", {"target_parameters": ["mlp.experts.down_proj"]},
                  {"base_model.model.model.layers.0.mlp.experts.lora_A.weight": torch.zeros(16, 32),
                   "base_model.model.model.layers.0.mlp.experts.lora_B.weight": torch.zeros(64, 16)})
    with pytest.raises(SftplugError, match=r"no tensor 'base_model.model.model.layers.1.mlp.experts.lora_A.weight'"):
        load_peft_adapter(model, tmp_path / "half")  # PEFT's target_parameters cover every layer
    dense = load_model(str(hf_folder)).model
    with pytest.raises(SftplugError, match=r"this model has no experts"):
        load_peft_adapter(dense, tmp_path / "half")
