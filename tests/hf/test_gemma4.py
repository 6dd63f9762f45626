"""Gemma 4 (gemma4_text) from a random checkpoint saved by transformers, with every option of its
blocks on: per-layer inputs, full-attention layers with their own head_dim and kv heads whose values
are their keys, proportional RoPE, the last two layers reusing earlier layers' keys and values with
double-wide MLPs, a window shorter than the rows, layer scalars, soft-capped logits, tied embeddings;
and the same model with experts beside each MLP (enable_moe_block)."""

import re

import pytest
import torch

from sftplug.config import ASSETS
from sftplug.errors import SftplugError
from sftplug.hf.config import config_from_hf
from sftplug.loading import load_model

transformers = pytest.importorskip("transformers")

GEMMA4 = dict(vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
              attention_k_eq_v=True, sliding_window=8, num_kv_shared_layers=2, use_double_wide_mlp=True,
              layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
              hidden_size_per_layer_input=8, vocab_size_per_layer_input=1024, final_logit_softcapping=5.0,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16)
IDS = torch.randint(3, 1024, (2, 24), generator=torch.Generator().manual_seed(4))


def relative_error(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def make_gemma4_folder(folder, **overrides):
    """A random gemma4_text checkpoint with its norms, layer scalars and router scales off their initial values."""
    config = transformers.Gemma4TextConfig(**{**GEMMA4, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if "norm" in name or name.endswith(("layer_scalar", "router.scale", "per_expert_scale")):
                t.add_(torch.randn_like(t) * 0.2)
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(ASSETS).save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    """(transformers' model, its folder), once per module."""
    folder = tmp_path_factory.mktemp("gemma4")
    return make_gemma4_folder(folder), folder


@pytest.fixture(scope="module")
def gemma4_moe(tmp_path_factory):
    """The same with experts beside each MLP: (transformers' model, its folder)."""
    folder = tmp_path_factory.mktemp("gemma4_moe")
    return make_gemma4_folder(folder, **MOE), folder


def test_logits_match_transformers(gemma4):
    reference, folder = gemma4
    model = load_model(str(folder), dtype=torch.float32).model
    assert model.attention_options(seq_len=24)["window"] == 8
    with torch.no_grad():
        got, ref = model(IDS), reference(IDS).logits
    assert got.shape == ref.shape == (2, 24, 1024)
    assert relative_error(got, ref) <= 1e-4


def test_moe_logits_and_routing_match_transformers(gemma4_moe):
    """Each layer routes each token to transformers' experts, in its order, with its weights (fp32 softmax of
    a 64-long product, 1e-5); the routing kept for the experts' loads is that one."""
    from sftplug.model.routing import routings

    reference, folder = gemma4_moe
    model = load_model(str(folder), dtype=torch.float32).model
    theirs, ours = [], []
    hooks = [layer.router.register_forward_hook(lambda m, i, out: theirs.append(out[1:]))
             for layer in reference.model.layers]
    hooks += [block.mlp.router.register_forward_hook(lambda m, i, out: ours.append(out[1:])) for block in model.layers]
    with torch.no_grad():
        got, ref = model(IDS), reference(IDS).logits
    for hook in hooks:
        hook.remove()
    assert relative_error(got, ref) <= 1e-4
    assert len(ours) == len(theirs) == 4
    for kept, (weights, experts), (their_weights, their_experts) in zip(routings(model), ours, theirs):
        assert torch.equal(experts, their_experts) and torch.equal(kept.experts, experts)
        assert torch.allclose(weights, their_weights, rtol=1e-5, atol=0)


def test_router_aux_loss_coef_is_refused_as_gemma4_has_no_load_balancing_loss(gemma4_moe):
    from sftplug.train.balance import balance_of

    model = load_model(str(gemma4_moe[1]), dtype=torch.float32).model
    with pytest.raises(SftplugError, match=re.escape("--router-aux-loss-coef 0.01: gemma4_text scales each expert's "
                                                     "weight (per_expert_scale), and transformers defines no")):
        balance_of(model, 0.01, 1, torch.device("cpu"))
    balance = balance_of(model, None, 1, torch.device("cpu"))  # the experts' loads are still reported
    assert balance.coef == 0 and not balance.has_aux and balance.shape == (4, 4)


def test_activation_checkpointing_keeps_the_gradients_through_shared_keys_and_values(gemma4):
    """The sharing layers' gradient reaches the layers whose keys and values they reuse, with --grad-ckpt too."""
    _, folder = gemma4
    model = load_model(str(folder), dtype=torch.float32).model.train()
    grads = []
    for checkpointing in (False, True):
        model.checkpoint_blocks = checkpointing
        model.zero_grad()
        model(IDS).float().square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert float(grads[0]["layers.1.attn.k.weight"].abs().max()) > 0
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, rtol=1e-5, atol=1e-7 * float(grad.abs().max())), name


@pytest.mark.parametrize("which", ["gemma4", "gemma4_moe"])
def test_generation_gives_transformers_greedy_answer(which, request):
    """Past the 8-token window, the sharing layers reading their source's cache (and routing one token a step)."""
    from sftplug.model.generate import generate_ids

    reference, folder = request.getfixturevalue(which)
    model = load_model(str(folder), dtype=torch.float32).model
    prompt = IDS[0, :10].tolist()
    want = reference.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, 10:].tolist()
    assert generate_ids(model, prompt, 10, eos_id=None) == want


@pytest.mark.parametrize("key,value,message", [
    ("use_bidirectional_attention", "all", "use_bidirectional_attention='all' (bidirectional attention) is not "
                                           "supported"),
    ("enable_moe_block", True, "enable_moe_block needs num_experts as a positive integer, got None"),
    ("rope_parameters", {"full_attention": {"rope_type": "yarn", "factor": 2.0}}, "rope_type 'yarn' is not supported"),
    ("num_kv_shared_layers", 4, "num_kv_shared_layers=4: each sharing layer needs an earlier layer of its kind"),
])
def test_what_cannot_run_exactly_is_refused_naming_the_key(key, value, message):
    hf = dict(GEMMA4, model_type="gemma4_text", **{key: value})
    with pytest.raises(SftplugError, match=re.escape(message)):
        config_from_hf(hf, where="ckpt/config.json")


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.fixture(scope="module", params=["dense", "moe"])
def lora_pair(request, tmp_path_factory):
    """(transformers + PEFT with every B off zero, sftplug with the same adapter read from PEFT's folder, the
    tokenizer, the folder); with experts, their LoRA too (PEFT's target_parameters)."""
    from sftplug.hf.peft_adapter import load_peft_adapter

    peft = pytest.importorskip("peft")
    _, folder = request.getfixturevalue("gemma4" if request.param == "dense" else "gemma4_moe")
    adapter = tmp_path_factory.mktemp("gemma4_adapter")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
    options = dict(target_modules=TARGETS)
    if request.param == "moe":  # the linear layers in full: PEFT reads a bare gate_proj of an MoE as its experts'
        options = dict(target_parameters=EXPERTS, target_modules=[
            n for n, m in theirs.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS])
    torch.manual_seed(0)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, **options))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)
    theirs.save_pretrained(str(adapter))
    loaded = load_model(str(folder), dtype=torch.float32)
    loaded.model.requires_grad_(False)
    return theirs, load_peft_adapter(loaded.model, adapter), loaded.tokenizer, folder


def test_one_lora_update_equals_transformers_and_peft(lora_pair, grads_as_peft):
    from sftplug.model.lora import lm_head_weight
    from sftplug.train.loss import IGNORE, target_loss_sum

    theirs, ours, _, _ = lora_pair
    theirs.zero_grad(), ours.zero_grad()
    labels = torch.cat([IDS[:, 1:], torch.full_like(IDS[:, :1], IGNORE)], dim=1)
    total, n = target_loss_sum(ours(IDS, hidden_only=True), labels, lm_head_weight(ours), logit_softcap=5.0)
    loss, ref_loss = total / n, theirs(input_ids=IDS, labels=IDS).loss
    loss.backward(), ref_loss.backward()
    assert relative_error(loss.detach(), ref_loss.detach()) <= 1e-5
    ref = {n.replace("base_model.model.", "", 1).replace(".default.weight", ".weight"): p.grad
           for n, p in theirs.named_parameters() if p.requires_grad}
    got = grads_as_peft(ours)
    assert set(got) == set(ref) and "model.layers.1.self_attn.k_proj.lora_A.weight" in got
    assert "model.layers.1.self_attn.v_proj.lora_A.weight" not in got  # its values are its keys
    assert ("model.layers.3.experts.base_layer.lora_A.weight" in got) == ours.config.has_experts
    # fp32 sums of a few hundred products, 1e-5 of the layer's gradient scale in other families; Gemma 4's
    # softmax scale is 1 over RMS-normed q and k, so its logits reach ~head_dim (32) rather than ~sqrt(head_dim)
    # and their rounding, that much larger, reaches every gradient upstream: 3e-5 (1.3e-5 measured here)
    for name in ref:
        layer = re.match(r"model\.layers\.\d+\.", name).group()
        scale = max(float(g.abs().max()) for n, g in ref.items() if n.startswith(layer))
        assert float((got[name] - ref[name]).abs().max()) <= 3e-5 * scale, name


def test_adapter_and_merged_exports_give_sftplugs_logits(lora_pair, tmp_path):
    from sftplug.checkpoint.export import plain_weights, write_hf_model
    from sftplug.hf.names import to_hf_state_dict
    from sftplug.hf.peft_adapter import write_peft_adapter

    peft = pytest.importorskip("peft")
    _, ours, tokenizer, folder = lora_pair
    with torch.no_grad():
        want = ours(IDS)
    write_peft_adapter(tmp_path / "exported", ours, folder)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
    reloaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "exported")).eval()
    (tmp_path / "merged").mkdir()
    weights = to_hf_state_dict(plain_weights(ours, merge=True), ours.config)  # as sftplug export writes them
    write_hf_model(tmp_path / "merged", weights, ours.config, torch.float32, tokenizer, 2**30)
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), attn_implementation="eager")
    # PEFT adds the experts' LoRA to their weights (W + BA) where sftplug applies its factors: rounded apart, as
    # the 1e-4 of the other families' exports allows (1.2e-5 measured; the dense layers' LoRA agrees to 1e-5)
    tolerance = 1e-4 if ours.config.has_experts else 1e-5
    with torch.no_grad():
        assert relative_error(reloaded(IDS).logits, want) <= tolerance
        assert relative_error(merged.eval()(IDS).logits, want) <= 1e-5


def test_a_gemma4_folder_trains_its_language_model_and_exports_it(tmp_path, registry, quiet):
    """Gemma 4 as published: a gemma4 folder, vision and audio towers beside the gemma4_text language model.
    sftplug trains the language model, says both towers are left out, and exports the language model as a
    gemma4_text folder transformers loads."""
    from sftplug.checkpoint.export import export_checkpoint
    from sftplug.config import DEFAULT_DATA, TrainConfig
    from sftplug.train.loop import train

    text = {k: v for k, v in GEMMA4.items() if not k.endswith("token_id")}
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64)
    audio = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[8, 4],
                 output_proj_dims=32)
    torch.manual_seed(0)
    reference = transformers.Gemma4ForConditionalGeneration(
        transformers.Gemma4Config(text_config=text, vision_config=vision, audio_config=audio)).eval()
    base = tmp_path / "gemma4"
    reference.save_pretrained(base)
    transformers.AutoTokenizer.from_pretrained(str(ASSETS)).save_pretrained(base)
    loaded = load_model(str(base), dtype=torch.float32)
    assert re.search(r"its vision and audio towers \(\d+ tensors such as model\.audio_tower\.\S+\) are left out",
                     loaded.description)
    with torch.no_grad():
        assert relative_error(loaded.model(IDS), reference(input_ids=IDS).logits) <= 1e-4
    data = tmp_path / "data.jsonl"
    data.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:16]))
    train(TrainConfig(model=str(base), data=str(data), out=str(tmp_path / "run"), steps=1, micro_bsz=2, seq_len=48,
                      eval_data=None, full=True, lr=3e-2, warmup=0), registry, echo=quiet)
    exported = export_checkpoint(str(tmp_path / "run"), tmp_path / "export")["model"]
    language_model = transformers.AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    assert type(language_model).__name__ == "Gemma4ForCausalLM" and language_model.config.tie_word_embeddings
    with torch.no_grad():
        trained = load_model(str(tmp_path / "run"), dtype=torch.float32).model(IDS)
        assert relative_error(language_model(IDS).logits, trained) <= 1e-4
        assert relative_error(trained, reference(input_ids=IDS).logits) > 1e-3  # the update changed it
