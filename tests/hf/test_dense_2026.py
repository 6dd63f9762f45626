"""The dense families of 2026 beyond what tests/hf/test_families.py checks for every family: one
LoRA update equal to transformers + PEFT's, transformers' greedy answer past the sliding window
(and past Ministral 3's query-scale period), packed documents equal to each document alone, and
Ministral 3 as people download it (a mistral3 folder: Pixtral vision tower + ministral3)."""

import pytest
import torch

from sftplug.hf.peft_adapter import load_peft_adapter
from sftplug.loading import load_model
from sftplug.model.generate import generate_ids
from sftplug.model.lora import lm_head_weight
from sftplug.train.loss import IGNORE, target_loss_sum

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# A window of 16 and (Ministral 3) a query-scale period of 8 in rows of 40: both bite several times.
MINISTRAL3_ROPE = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0, "original_max_position_embeddings": 8,
                   "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                   "llama_4_scaling_beta": 0.1}  # Ministral-3's own, but for its original length (16384)
FAMILIES = {  # make_hf_folder options (tests/conftest.py), as tests/hf/test_families.py has them
    # OLMo 3: layer 0 sliding with its own RoPE, layer 1 full with YaRN (as the long-context OLMo 3 configs)
    "olmo3": dict(config_class="Olmo3Config", sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
                                   "full_attention": {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0,
                                                      "original_max_position_embeddings": 16}},
                  pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "ministral3": dict(config_class="Ministral3Config", head_dim=16, sliding_window=16, rope_parameters=MINISTRAL3_ROPE,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(4))


def relative_error(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, make_hf_folder):
    """(name, folder, the transformers model it saved, sftplug's model of it in fp32)."""
    folder = tmp_path_factory.mktemp(request.param)
    reference = make_hf_folder(folder, **FAMILIES[request.param])
    return request.param, folder, reference, load_model(str(folder), dtype=torch.float32).model


def test_one_lora_update_equals_transformers_and_peft(family, tmp_path, grads_as_peft):
    name, folder, _, _ = family
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():  # B off zero, as after training: every gradient is nonzero
        for key, p in theirs.named_parameters():
            if "lora_B" in key:
                p.add_(torch.randn_like(p) * 0.05)
    theirs.save_pretrained(str(tmp_path / "adapter"))
    ours = load_model(str(folder), dtype=torch.float32).model
    ours.requires_grad_(False)
    ours = load_peft_adapter(ours, tmp_path / "adapter")
    labels = torch.cat([IDS[:, 1:], torch.full_like(IDS[:, :1], IGNORE)], dim=1)
    total, n = target_loss_sum(ours(IDS, hidden_only=True), labels, lm_head_weight(ours))
    loss, ref_loss = total / n, theirs(input_ids=IDS, labels=IDS).loss
    loss.backward(), ref_loss.backward()
    assert relative_error(loss.detach(), ref_loss.detach()) <= 1e-5
    ref = {k.replace("base_model.model.", "", 1).replace(".default.weight", ".weight"): p.grad
           for k, p in theirs.named_parameters() if p.requires_grad}
    got = grads_as_peft(ours)
    assert set(got) == set(ref) and len(ref) == 2 * 2 * len(TARGETS)
    for key in ref:  # fp32 sums over 40 positions and 64-96 features: 1e-5 of the layer's gradient scale
        layer = key.split(".mlp.")[0].split(".self_attn.")[0] + "."
        scale = max(float(g.abs().max()) for k, g in ref.items() if k.startswith(layer))
        assert float((got[key] - ref[key]).abs().max()) <= 1e-5 * scale, f"{name}: {key}"


def test_generation_gives_transformers_greedy_answer_past_the_window(family):
    """A prompt of 12 and 20 new tokens: the cache grows past the window of 16, and Ministral 3's
    query scale, at positions offset by the cache, steps up at 16, 24 and 32."""
    _, _, reference, model = family
    prompt = IDS[0, :12].tolist()
    want = reference.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, 12:].tolist()
    assert generate_ids(model, prompt, 20, eos_id=None) == want


def test_packed_documents_equal_each_document_alone(family):
    """Positions restart with each document, and with them the window and Ministral 3's query scale."""
    _, _, _, model = family
    ids = IDS[:1]
    doc_ids = torch.zeros(1, 40, dtype=torch.int32)
    doc_ids[:, 13:] = 1
    positions = torch.cat([torch.arange(13), torch.arange(27)])[None]
    with torch.no_grad():
        packed = model(ids, positions, doc_ids)
        alone = torch.cat([model(ids[:, :13]), model(ids[:, 13:])], dim=1)
    assert relative_error(packed, alone) <= 1e-5


def test_ministral3_query_scale_bites(tmp_path, make_hf_folder):
    """Without its query scale sftplug's model would not be transformers': the test above and
    tests/hf/test_families.py would catch a missing or misplaced scale."""
    reference = make_hf_folder(tmp_path, **FAMILIES["ministral3"])
    model = load_model(str(tmp_path), dtype=torch.float32).model
    with torch.no_grad():
        want = reference(IDS).logits
        assert relative_error(model(IDS), want) <= 1e-4
        model.config.attention.query_scale_beta = 0.0  # a model that forgot it
        assert relative_error(model(IDS), want) > 1e-3


def test_a_mistral3_folder_trains_its_language_model_and_exports_it(tmp_path, registry, quiet):
    """Ministral 3 as published: a mistral3 folder, Pixtral's vision tower beside the ministral3 language
    model (an LM head of its own, stored as language_model.lm_head). sftplug trains the language model,
    says the tower is left out, and exports the language model as a ministral3 folder transformers loads."""
    from sftplug.checkpoint.export import export_checkpoint
    from sftplug.config import ASSETS, DEFAULT_DATA, TrainConfig
    from sftplug.train.loop import train

    text = dict(model_type="ministral3", vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                sliding_window=16, rope_parameters=dict(MINISTRAL3_ROPE))
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=16, image_size=28, patch_size=14)
    torch.manual_seed(0)
    reference = transformers.Mistral3ForConditionalGeneration(
        transformers.Mistral3Config(text_config=text, vision_config=vision, tie_word_embeddings=False)).eval()
    base = tmp_path / "mistral3"
    reference.save_pretrained(base)
    transformers.AutoTokenizer.from_pretrained(str(ASSETS)).save_pretrained(base)
    loaded = load_model(str(base), dtype=torch.float32)
    assert "its Pixtral vision tower (15 tensors such as multi_modal_projector." in loaded.description
    with torch.no_grad():
        assert relative_error(loaded.model(IDS), reference(input_ids=IDS).logits) <= 1e-4
    data = tmp_path / "data.jsonl"
    data.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:16]))
    train(TrainConfig(model=str(base), data=str(data), out=str(tmp_path / "run"), steps=1, micro_bsz=2, seq_len=48,
                      eval_data=None, full=True, lr=3e-2, warmup=0), registry, echo=quiet)
    exported = export_checkpoint(str(tmp_path / "run"), tmp_path / "export")["model"]
    language_model = transformers.AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    assert language_model.config.model_type == "ministral3" and not language_model.config.tie_word_embeddings
    with torch.no_grad():
        trained = load_model(str(tmp_path / "run"), dtype=torch.float32).model(IDS)
        assert relative_error(language_model(IDS).logits, trained) <= 1e-4
        assert relative_error(trained, reference(input_ids=IDS).logits) > 1e-3  # the update changed it


def test_ministral3s_published_rope_parameters_are_transformers_yarn_bitwise():
    """Ministral-3's own rope_parameters (Ministral3Config's defaults: mscale and mscale_all_dim 1, the
    legacy "type" key, max_position_embeddings among them): the same fp32 frequencies and cos/sin scale."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from sftplug.hf.config import config_from_hf
    from sftplug.model.rope import rope_attention_factor, rope_inv_freq

    reference = transformers.Ministral3Config(num_hidden_layers=1)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](reference, "cpu")
    config = config_from_hf(reference.to_dict())
    assert torch.equal(rope_inv_freq(config), inv_freq) and rope_attention_factor(config) == factor
    assert (config.attention.query_scale_beta, config.attention.query_scale_period) == (0.1, 16384)


def test_a_mistral3_folders_dtype_and_quantization_hold_for_its_language_model():
    """Ministral-3's published folders declare both on the outer config: bf16 weights load as bf16, and
    FP8 ones are refused in one line by the loader (sftplug.hf.mxfp4) rather than read as bf16."""
    from sftplug.hf.config import config_from_hf

    text = dict(model_type="ministral3", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, head_dim=8, rope_parameters=dict(MINISTRAL3_ROPE))
    fp8 = {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None}
    config = config_from_hf({"model_type": "mistral3", "text_config": text, "vision_config": {"model_type": "pixtral"},
                             "dtype": "bfloat16", "quantization_config": fp8, "tie_word_embeddings": False})
    assert config.architecture == "ministral3" and config.extra["language_model_of"] == "mistral3"
    assert config.extra["dtype"] == "bfloat16" and config.extra["quantization_config"] == fp8
