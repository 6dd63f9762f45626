"""The hybrid families (Gated DeltaNet layers beside gated attention), each from a random HF
checkpoint saved by transformers: logits equal to transformers' (fp32, 1e-4 of their scale)
over rows longer than a chunk, transformers' greedy answer from the recurrent state, and packed
documents equal to each document alone."""

import pytest
import torch

from sftplug.loading import load_model

transformers = pytest.importorskip("transformers")

LINEAR = dict(num_hidden_layers=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
              linear_key_head_dim=16, linear_value_head_dim=8)  # layers 0-2 linear, 3 full attention
EXPERTS = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
FAMILIES = {  # make_hf_folder options (tests/conftest.py)
    "qwen3_5_text": dict(config_class="Qwen3_5TextConfig", **LINEAR),
    "qwen3_next": dict(config_class="Qwen3NextConfig", **LINEAR, **EXPERTS),  # in_proj_qkvz / in_proj_ba
    "qwen3_5_moe_text": dict(config_class="Qwen3_5MoeTextConfig", **LINEAR, **EXPERTS),
}
IDS = torch.randint(0, 1024, (2, 150), generator=torch.Generator().manual_seed(1))  # 3 chunks of 64


def relative_error(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.fixture(params=list(FAMILIES))
def family(request, tmp_path, make_hf_folder):
    reference = make_hf_folder(tmp_path, **FAMILIES[request.param])
    return request.param, reference, load_model(str(tmp_path), dtype=torch.float32).model


def test_logits_match_transformers(family):
    name, reference, model = family
    assert [t.mixer for t in model.config.layer_types] == ["linear_attention"] * 3 + ["attention"]
    with torch.no_grad():
        got, ref = model(IDS), reference(IDS).logits
    assert relative_error(got, ref) <= 1e-4, f"{name}: {relative_error(got, ref):.2e}"


def test_generation_gives_transformers_greedy_answer(family):
    _, reference, model = family
    from sftplug.model.generate import generate_ids

    prompt = IDS[0, :70].tolist()  # a prefill longer than a chunk, then the recurrent state token by token
    want = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, 70:].tolist()
    assert generate_ids(model, prompt, 8, eos_id=None) == want


def test_packed_documents_equal_each_document_alone(family):
    """Neither the convolution nor the recurrent state crosses the boundary at token 37."""
    _, _, model = family
    ids = IDS[:1, :100]
    doc_ids = torch.zeros(1, 100, dtype=torch.int32)
    doc_ids[:, 37:] = 1
    positions = torch.cat([torch.arange(37), torch.arange(63)])[None]
    with torch.no_grad():
        packed = model(ids, positions, doc_ids)
        alone = torch.cat([model(ids[:, :37]), model(ids[:, 37:])], dim=1)
    assert relative_error(packed, alone) <= 1e-5


def test_a_vision_language_folder_trains_its_language_model_and_exports_it(tmp_path, registry, quiet):
    """Qwen3.5 as published: a vision tower beside the language model. sftplug trains the language model,
    says the tower is left out, and exports the language model as a folder transformers loads."""
    from sftplug.checkpoint.export import export_checkpoint
    from sftplug.config import ASSETS, DEFAULT_DATA, TrainConfig
    from sftplug.train.loop import train

    text = dict(vocab_size=1024, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, **LINEAR)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  num_position_embeddings=16)
    torch.manual_seed(0)
    reference = transformers.Qwen3_5ForConditionalGeneration(
        transformers.Qwen3_5Config(text_config=text, vision_config=vision)).eval()
    base = tmp_path / "qwen3_5"
    reference.save_pretrained(base)
    transformers.AutoTokenizer.from_pretrained(str(ASSETS)).save_pretrained(base)
    loaded = load_model(str(base), dtype=torch.float32)
    assert "its vision tower (21 tensors such as model.visual." in loaded.description
    with torch.no_grad():
        assert relative_error(loaded.model(IDS), reference(input_ids=IDS).logits) <= 1e-4
    data = tmp_path / "data.jsonl"
    data.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:16]))
    train(TrainConfig(model=str(base), data=str(data), out=str(tmp_path / "run"), steps=1, micro_bsz=2, seq_len=48,
                      eval_data=None, full=True, lr=3e-2, warmup=0), registry, echo=quiet)
    exported = export_checkpoint(str(tmp_path / "run"), tmp_path / "export")["model"]
    language_model = transformers.AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    assert language_model.config.model_type == "qwen3_5_text"
    with torch.no_grad():
        trained = load_model(str(tmp_path / "run"), dtype=torch.float32).model(IDS)
        assert relative_error(language_model(IDS).logits, trained) <= 1e-4


@pytest.mark.parametrize("model_type, layers", [("nemotron_h", "Mamba-2 layers"), ("lfm2", "short convolution layers"),
                                                ("kimi_linear", "Kimi Delta Attention layers")])
def test_other_hybrids_are_refused_naming_their_layer_type(model_type, layers):
    from sftplug.errors import SftplugError
    from sftplug.hf.config import config_from_hf

    with pytest.raises(SftplugError, match=f"^config.json: model_type '{model_type}' has {layers}, which sftplug "
                                           "does not run"):
        config_from_hf({"model_type": model_type, "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2})
