"""Every family sftplug loads trains (3 LoRA and 3 full updates) and exports: merged as an HF
folder and as base + PEFT adapter, each loaded by transformers / peft with sftplug's logits."""

import json
import warnings

import pytest
import torch

from sftplug.checkpoint.export import export_checkpoint
from sftplug.config import DEFAULT_DATA, TrainConfig
from sftplug.data.tokenizer import Tokenizer
from sftplug.loading import load_model
from sftplug.train.loop import train

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FAMILIES = {  # make_hf_folder options, as tests/hf/test_families.py has them
    "mistral-window": dict(config_class="MistralConfig", head_dim=16, sliding_window=16),
    "qwen3": dict(config_class="Qwen3Config", head_dim=32),
    "gemma2": dict(config_class="Gemma2Config", head_dim=32, query_pre_attn_scalar=24, sliding_window=16,
                   attn_logit_softcapping=0.5, final_logit_softcapping=0.5),
    "gemma3": dict(config_class="Gemma3TextConfig", head_dim=32, query_pre_attn_scalar=24, sliding_window=16,
                   layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(config_class="Phi3Config", partial_rotary_factor=0.5, sliding_window=16, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2),
    "olmo2": dict(config_class="Olmo2Config", pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "smollm3": dict(config_class="SmolLM3Config", no_rope_layer_interval=2, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2),
    "granite": dict(config_class="GraniteConfig", embedding_multiplier=12.0, residual_multiplier=0.22,
                    attention_multiplier=0.05, logits_scaling=8.0),
    "olmo3": dict(config_class="Olmo3Config", sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
                                   "full_attention": {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0,
                                                      "original_max_position_embeddings": 16}},
                  pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "ministral3": dict(config_class="Ministral3Config", head_dim=16, sliding_window=16,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                                        "original_max_position_embeddings": 8, "beta_fast": 32.0, "beta_slow": 1.0,
                                        "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1},
                       pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # mixtures of experts (LoRA on the experts too, the load-balancing loss on) and hybrids, as
    # tests/hf/test_moe_families.py and test_hybrid_families.py have them
    "qwen3_moe": dict(config_class="Qwen3MoeConfig", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True, mlp_only_layers=[1], head_dim=16),
    "qwen2_moe": dict(config_class="Qwen2MoeConfig", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, head_dim=16),
    "mixtral": dict(config_class="MixtralConfig", num_local_experts=8, num_experts_per_tok=2, intermediate_size=32,
                    sliding_window=16, head_dim=16),
    "olmoe": dict(config_class="OlmoeConfig", num_experts=8, num_experts_per_tok=2, intermediate_size=32,
                  head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "glm4_moe": dict(config_class="Glm4MoeConfig", n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                     first_k_dense_replace=1, n_group=4, topk_group=2, n_shared_experts=1, use_qk_norm=True,
                     partial_rotary_factor=0.5, routed_scaling_factor=2.5, attention_bias=True, head_dim=16),
    "gpt_oss": dict(config_class="GptOssConfig", num_local_experts=8, num_experts_per_tok=2, intermediate_size=32,
                    sliding_window=16, layer_types=["sliding_attention", "full_attention"], head_dim=16),
    "qwen3_5_text": dict(config_class="Qwen3_5TextConfig", num_hidden_layers=4, head_dim=16, linear_num_key_heads=2,
                         linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8),
    "qwen3_next": dict(config_class="Qwen3NextConfig", num_hidden_layers=4, head_dim=16, linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8, num_experts=8,
                       num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48),
    "qwen3_5_moe_text": dict(config_class="Qwen3_5MoeTextConfig", num_hidden_layers=4, head_dim=16,
                             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                             linear_value_head_dim=8, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                             shared_expert_intermediate_size=48),
    "gemma4_text": dict(config_class="Gemma4TextConfig", num_hidden_layers=4, head_dim=16, global_head_dim=32,
                        num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=16, num_kv_shared_layers=2,
                        use_double_wide_mlp=True, hidden_size_per_layer_input=8, vocab_size_per_layer_input=1024,
                        layer_types=["sliding_attention", "full_attention"] * 2),
    "gemma4_text-moe": dict(config_class="Gemma4TextConfig", head_dim=16, global_head_dim=32, sliding_window=16,
                            layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=8,
                            vocab_size_per_layer_input=1024, enable_moe_block=True, num_experts=8, top_k_experts=2,
                            moe_intermediate_size=32),
}
IDS = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(3))
CHAT = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]


def relative_error(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def sftplug_logits(source):
    with torch.no_grad():
        return load_model(str(source)).model(IDS)


def hf_logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager")


def assert_renders_as_trained(exported, base):
    """transformers renders the export's chat template as the run rendered the base's (its chat_template.jinja)."""
    trained = Tokenizer(base)
    assert trained.template_source == "chat_template.jinja"  # make_hf_folder saves the tokenizer as transformers 5
    hf = transformers.AutoTokenizer.from_pretrained(str(exported))
    assert hf.apply_chat_template(CHAT, tokenize=False) == trained.render(CHAT)
    assert hf.apply_chat_template(CHAT[:1], add_generation_prompt=True, tokenize=False) == trained.render(
        CHAT[:1], add_generation_prompt=True)


def run(tmp_path, registry, quiet, base, **options):
    data = tmp_path / "data.jsonl"  # a few records: tokenizing is not what is tested here
    data.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:64]))
    config = TrainConfig(model=str(base), data=str(data), out=str(tmp_path / "run"), steps=3, micro_bsz=2,
                         seq_len=48, eval_data=None, lr=3e-2, warmup=0, log_every=100, **options)
    records = []
    train(config, registry, echo=quiet)
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        records.append(json.loads(line))
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    return tmp_path / "run"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_trains_and_exports_merged_and_as_an_adapter(tmp_path, family, make_hf_folder, registry, quiet):
    base = tmp_path / "hf"
    make_hf_folder(base, **FAMILIES[family])
    folder = run(tmp_path, registry, quiet, base)
    ours = sftplug_logits(folder)
    assert relative_error(ours, hf_logits(hf_model(base))) > 1e-3  # the adapter changed the model
    merged = export_checkpoint(folder, tmp_path / "merged", merge=True)["model"]
    assert relative_error(hf_logits(hf_model(merged)), ours) <= 1e-4
    assert_renders_as_trained(merged, base)
    parts = export_checkpoint(folder, tmp_path / "split", merge=False)
    assert_renders_as_trained(parts["base"], base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.PeftModel.from_pretrained(hf_model(parts["base"]), str(parts["adapter"]))
    assert relative_error(hf_logits(wrapped), ours) <= 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_fine_tuning_trains_and_exports(tmp_path, family, make_hf_folder, registry, quiet):
    base = tmp_path / "hf"
    make_hf_folder(base, **FAMILIES[family])
    folder = run(tmp_path, registry, quiet, base, full=True)
    ours = sftplug_logits(folder)
    assert relative_error(ours, hf_logits(hf_model(base))) > 1e-3
    out = export_checkpoint(folder, tmp_path / "out", merge=False)["model"]
    exported = json.loads((out / "config.json").read_text())
    assert exported["model_type"] == json.loads((base / "config.json").read_text())["model_type"]
    assert relative_error(hf_logits(hf_model(out)), ours) <= 1e-4
    assert_renders_as_trained(out, base)
