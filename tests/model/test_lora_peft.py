"""sftplug's LoRA on the fused qkv / gate_up equals HF transformers + PEFT on q_proj ... down_proj:
forward, loss, adapter gradients, one AdamW update, the trainable count, rslora and DoRA, and a
PEFT adapter continued under ``sftplug train --adapter``."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from sftplug.cli import cli
from sftplug.config import TrainConfig
from sftplug.errors import SftplugError
from sftplug.hf.peft_adapter import load_peft_adapter, peft_tensors
from sftplug.loading import load_model
from sftplug.model.lora import apply_lora
from sftplug.train.loop import train

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IDS = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(3))
R, ALPHA = 4, 8.0


def relative_error(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def peft_model(folder, targets=ALL, dropout=0.0, seed=0, **options):
    """HF Llama + PEFT LoRA with B moved off zero (as after training), so every gradient is nonzero."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=list(targets), **options)
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.add_(torch.randn_like(p) * (0.05 if "lora_B" in name else 0.02 * p.abs().mean()))
    return model


def ours_from(theirs, folder, tmp_path):
    """sftplug's model with the PEFT model's adapter (saved by peft, read by --adapter's loader)."""
    theirs.save_pretrained(str(tmp_path / "adapter"))
    model = load_model(str(folder)).model
    model.requires_grad_(False)
    return load_peft_adapter(model, tmp_path / "adapter")


def loss_of(logits):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten())


def peft_grads(theirs) -> dict:
    names = {n: n.replace("base_model.model.", "", 1).replace(".default.weight", ".weight") for n, _ in
             theirs.named_parameters()}  # as peft saves them: ...lora_A.weight, ...lora_magnitude_vector
    return {names[n].replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p.grad
            for n, p in theirs.named_parameters() if p.requires_grad}


def one_update(model, forward):
    model.train()
    loss = loss_of(forward(model))
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("targets", [ALL, ("q_proj", "v_proj")], ids=["default", "q-v"])
def test_one_update_equals_hf_peft(hf_folder, tmp_path, targets, grads_as_peft):
    theirs = peft_model(hf_folder, targets)
    ours = ours_from(theirs, hf_folder, tmp_path)
    ref_loss = one_update(theirs, lambda m: m(IDS).logits)
    loss = one_update(ours, lambda m: m(IDS))
    assert relative_error(loss, ref_loss) <= 1e-5
    ref, got = peft_grads(theirs), grads_as_peft(ours)
    assert set(got) == set(ref) and len(ref) == 2 * 2 * len(targets)
    for name in ref:
        assert relative_error(got[name], ref[name]) <= 1e-5, name
        assert float(ref[name].abs().max()) > 0, name  # no gradient is trivially zero

    # one update, weight decay on: the same adapter (SGD: Adam's first step g/|g| would magnify the
    # rounding of gradients near zero), and AdamW keeps the off-diagonal blocks of B at zero
    for model in (theirs, ours):
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, weight_decay=0.1).step()
    after = {n.replace("base_model.model.", "", 1): t for n, t in peft.get_peft_model_state_dict(theirs).items()}
    mine = {n.replace("base_model.model.", "", 1): t for n, t in peft_tensors(ours).items()}
    assert set(mine) == set(after)
    for name in after:
        assert relative_error(mine[name], after[name]) <= 1e-5, name
    torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1).step()
    b = ours.layers[0].attn.qkv.lora_B["default"].weight
    in_blocks = sum(mine[f"model.layers.0.self_attn.{p}.lora_B.weight"].numel() for p in targets if p[0] in "qkv")
    assert int((b != 0).sum()) == in_blocks < b.numel()


def test_dropout_masks_are_drawn_per_projection_as_peft_draws_them(hf_folder, tmp_path, grads_as_peft):
    theirs = peft_model(hf_folder, dropout=0.3)
    ours = ours_from(theirs, hf_folder, tmp_path)
    torch.manual_seed(7)
    ref_loss = one_update(theirs, lambda m: m(IDS).logits)
    torch.manual_seed(7)
    loss = one_update(ours, lambda m: m(IDS))
    assert relative_error(loss, ref_loss) <= 1e-5  # the same masks: drawn in HF's module order
    ref, got = peft_grads(theirs), grads_as_peft(ours)
    for name in ref:
        assert relative_error(got[name], ref[name]) <= 1e-5, name


@pytest.mark.parametrize("options", [{"use_rslora": True}, {"use_dora": True}], ids=["rslora", "dora"])
@pytest.mark.parametrize("targets", [ALL, ("q_proj", "v_proj", "up_proj")], ids=["default", "subset"])
def test_rslora_and_dora_equal_peft(hf_folder, tmp_path, options, targets, grads_as_peft):
    theirs = peft_model(hf_folder, targets, **options)
    ours = ours_from(theirs, hf_folder, tmp_path)
    assert ours.lora_spec.rslora == options.get("use_rslora", False)
    assert ours.lora_spec.variant == ("dora" if options.get("use_dora") else "lora")
    ref_loss = one_update(theirs, lambda m: m(IDS).logits)
    loss = one_update(ours, lambda m: m(IDS))
    assert relative_error(loss, ref_loss) <= 1e-5
    ref, got = peft_grads(theirs), grads_as_peft(ours)
    assert set(got) == set(ref)
    for name in ref:
        assert relative_error(got[name], ref[name]) <= 1e-5, name


def test_fresh_lora_is_initialised_as_peft_initialises_each_projection(hf_folder):
    model = load_model(str(hf_folder)).model
    model.requires_grad_(False)
    torch.manual_seed(0)
    ours = apply_lora(model, R, ALPHA, 0.0, ALL)
    qkv = ours.layers[0].attn.qkv
    a, b = qkv.lora_A["default"].weight, qkv.lora_B["default"].weight
    assert a.shape == (3 * R, 64) and b.shape == (64 + 2 * 32, 3 * R) and not b.any()
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt(5)) on fan-in 64: PEFT's bound for each q/k/v layer
    for i in range(3):
        block = a[i * R:(i + 1) * R]
        assert float(block.abs().max()) <= bound and float(block.abs().max()) > 0.8 * bound
    assert qkv.scaling["default"] == ALPHA / R


@pytest.mark.parametrize("targets", [ALL, ("q_proj", "v_proj")], ids=["default", "q-v"])
def test_trainable_count_printed_is_peft_s(hf_folder, tmp_path, registry, targets):  # DoRA's: the --adapter test
    lines = []
    config = TrainConfig(model=str(hf_folder), out=str(tmp_path / "run"), steps=1, micro_bsz=1, seq_len=32,
                         eval_data=None, log_every=100, lora_r=R, lora_alpha=ALPHA, lora_targets=targets)
    train(config, registry, echo=lambda *a: lines.append(" ".join(map(str, a))))
    header = next(line for line in lines if line.startswith("model:"))
    printed = int(re.search(r"([\d,]+) trainable params as PEFT counts them", header).group(1).replace(",", ""))
    assert printed == peft_model(hf_folder, targets).num_parameters(only_trainable=True)
    assert ("B block-diagonal in qkv" if "gate_proj" not in targets else "B block-diagonal in gate_up/qkv") in header


def test_peft_adapter_continues_under_sftplug_train_adapter(hf_folder, tmp_path, registry):
    theirs = peft_model(hf_folder, ("q_proj", "k_proj", "v_proj", "gate_proj", "down_proj"), use_dora=True)
    theirs.save_pretrained(str(tmp_path / "adapter"))
    with torch.no_grad():
        ref = theirs.eval()(IDS).logits
    model = load_model(str(hf_folder)).model
    model.requires_grad_(False)
    ours = load_peft_adapter(model, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert relative_error(ours(IDS), ref) <= 1e-5  # logits before the first update

    # the CLI: one update from the adapter, saved; its export loads in peft with sftplug's logits
    result = CliRunner().invoke(cli, ["train", "--model", str(hf_folder), "--adapter", str(tmp_path / "adapter"),
                                      "--out", str(tmp_path / "run"), "--steps", "1", "--micro-bsz", "1",
                                      "--seq-len", "32", "--eval-data", "", "--lr", "1e-2"])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.startswith("model:"))
    assert f"adapter {tmp_path / 'adapter'}: DoRA r={R}" in header
    printed = int(re.search(r"([\d,]+) trainable params as PEFT counts them", header).group(1).replace(",", ""))
    assert printed == theirs.num_parameters(only_trainable=True)

    from sftplug.checkpoint.export import export_checkpoint

    parts = export_checkpoint(tmp_path / "run", tmp_path / "export", merge=False)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(parts["base"]), attn_implementation="eager")
    continued = peft.PeftModel.from_pretrained(base, str(parts["adapter"])).eval()
    trained = load_model(str(tmp_path / "run")).model
    with torch.no_grad():
        got = continued(IDS).logits
        assert relative_error(got, trained(IDS)) <= 1e-5
        assert relative_error(got, ref) > 1e-4  # the update changed the adapter


def test_adapters_sftplug_cannot_represent_are_refused_naming_the_key(hf_folder, tmp_path):
    theirs = peft_model(hf_folder, ("q_proj", "v_proj"))
    theirs.save_pretrained(str(tmp_path / "adapter"))
    config_path = tmp_path / "adapter" / "adapter_config.json"
    saved = json.loads(config_path.read_text())

    def refused(**changes):
        config_path.write_text(json.dumps({**saved, **changes}))
        model = load_model(str(hf_folder)).model
        with pytest.raises(SftplugError) as info:
            load_peft_adapter(model, tmp_path / "adapter")
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "'rank_pattern'" in refused(rank_pattern={"q_proj": 8})
    assert "'layers_to_transform'" in refused(layers_to_transform=[0])
    assert "'bias'" in refused(bias="all")
    assert "'peft_type'" in refused(peft_type="IA3")
    assert "lora_magnitude_vector" in refused(use_dora=True)  # a DoRA config without its magnitudes
    assert "has shape" in refused(r=8)

    config_path.write_text(json.dumps(saved))
    result = CliRunner().invoke(cli, ["train", "--model", str(hf_folder), "--adapter", str(tmp_path / "nowhere"),
                                      "--out", str(tmp_path / "run"), "--steps", "1"])
    assert result.exit_code == 2 and "no adapter_config.json" in result.output
    assert len(result.output.strip().splitlines()) == 1
