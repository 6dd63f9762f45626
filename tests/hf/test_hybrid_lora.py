"""LoRA on a hybrid model's linear-attention and gated-attention projections exactly as PEFT
trains it: a PEFT adapter read by --adapter's loader gives PEFT's loss and gradients, and the
adapter and merged exports load in peft / transformers with sftplug's logits."""

import pytest
import torch

from sftplug.checkpoint.export import plain_weights, write_hf_model
from sftplug.hf.names import to_hf_state_dict
from sftplug.hf.peft_adapter import load_peft_adapter, write_peft_adapter
from sftplug.loading import load_model
from sftplug.model.lora import lm_head_weight
from sftplug.train.loss import IGNORE, target_loss_sum

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]
LINEAR = dict(config_class="Qwen3_5TextConfig", num_hidden_layers=4, head_dim=16, linear_num_key_heads=2,
              linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8)
IDS = torch.randint(0, 1024, (2, 80), generator=torch.Generator().manual_seed(2))


def relative_error(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.fixture
def pair(tmp_path, make_hf_folder):
    """(transformers + PEFT with every B off zero, sftplug with the same adapter read from PEFT's folder)."""
    make_hf_folder(tmp_path / "base", **LINEAR)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), attn_implementation="eager")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)
    theirs.save_pretrained(str(tmp_path / "adapter"))
    loaded = load_model(str(tmp_path / "base"), dtype=torch.float32)
    loaded.model.requires_grad_(False)
    return theirs, load_peft_adapter(loaded.model, tmp_path / "adapter"), loaded.tokenizer


def test_one_update_equals_transformers_and_peft(pair, grads_as_peft):
    theirs, ours, _ = pair
    labels = torch.cat([IDS[:, 1:], torch.full_like(IDS[:, :1], IGNORE)], dim=1)
    total, n = target_loss_sum(ours(IDS, hidden_only=True), labels, lm_head_weight(ours))
    loss, ref_loss = total / n, theirs(input_ids=IDS, labels=IDS).loss
    loss.backward(), ref_loss.backward()
    assert relative_error(loss.detach(), ref_loss.detach()) <= 1e-5
    ref = {n.replace("base_model.model.", "", 1).replace(".default.weight", ".weight"): p.grad
           for n, p in theirs.named_parameters() if p.requires_grad}
    got = grads_as_peft(ours)
    assert set(got) == set(ref) and any(".linear_attn.in_proj_qkv." in k for k in got)
    for name in ref:
        # fp32 sums of a few hundred products per value: 1e-5 of the layer's gradient scale. The decay's
        # projection (in_proj_a) gets sums of such terms that cancel to ~1e-4 of them: its rounding is
        # that of the terms, so it is measured against the layer's scale, not its own.
        layer = name.split(".mlp.")[0].split(".linear_attn.")[0].split(".self_attn.")[0] + "."
        scale = max(float(g.abs().max()) for n, g in ref.items() if n.startswith(layer))
        assert float((got[name] - ref[name]).abs().max()) <= 1e-5 * scale, name


def test_adapter_and_merged_exports_give_sftplugs_logits(pair, tmp_path):
    _, ours, tokenizer = pair
    with torch.no_grad():
        want = ours(IDS)
    write_peft_adapter(tmp_path / "exported", ours, tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), attn_implementation="eager")
    reloaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "exported")).eval()
    (tmp_path / "merged").mkdir()
    weights = to_hf_state_dict(plain_weights(ours, merge=True), ours.config)  # as sftplug export writes them
    write_hf_model(tmp_path / "merged", weights, ours.config, torch.float32, tokenizer, 2**30)
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), attn_implementation="eager")
    with torch.no_grad():
        assert relative_error(reloaded(IDS).logits, want) <= 1e-5
        assert relative_error(merged.eval()(IDS).logits, want) <= 1e-5
