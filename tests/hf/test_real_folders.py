"""Model folders as people download them (issue #30, "Real folders"), for every family sftplug claims.

A download differs from a random checkpoint in ways that break a fine-tune quietly: bf16 weights
in several shards whose index has "metadata", embeddings tied and stored once, a tokenizer saved
by transformers 5 (its template in chat_template.jinja, extra_special_tokens, a vocabulary smaller
than the model's), a template whose turns end with a token other than the tokenizer's EOS, and a
generation_config.json that lists several EOS ids. Each folder here is saved by transformers
itself, trained through the CLI and exported; the tests assert what a user relies on.
"""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from sftplug.checkpoint.export import export_checkpoint
from sftplug.cli import cli
from sftplug.config import ASSETS
from sftplug.data.tokenizer import Tokenizer
from sftplug.loading import load_model
from sftplug.model.generate import answer, generate_ids

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# The template's special tokens, added to sftplug's tokenizer.json (1024 tokens): a turn ends with
# <|end_of_turn|> (as Gemma's <end_of_turn>), not with the tokenizer's EOS <|eos|> (id 2).
EXTRA_SPECIAL_TOKENS = ["<|start_of_turn|>", "<|end_of_turn|>", "<|image|>"]
END_OF_TURN = 1025
EOS_IDS = [2, END_OF_TURN]  # generation_config.json's eos_token_id
TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Roles are system, user and assistant') }}
    {%- endif %}
    {{- '<|start_of_turn|>' + message['role'] + '\\n' + message['content'] | trim + '<|end_of_turn|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_of_turn|>assistant\\n' }}
{%- endif %}
"""
CHATS = [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a color."},
     {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another one?"},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1, 2, 3."}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
]

# The text model's sizes (the vocabulary padded past the tokenizer's 1027 tokens, as published models pad it).
TEXT = dict(vocab_size=1032, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LINEAR = dict(layer_types=["linear_attention", "full_attention"], head_dim=16, linear_num_key_heads=2,
              linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8)  # Gated DeltaNet, attention
EXPERTS = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
SLIDING = dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"])
# family -> (transformers config class, options); tie_word_embeddings where the family's small published
# models tie them. A folder with towers names its language model's options under text_config.
FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True)),  # Llama 3.2 1B / 3B
    "mistral": ("MistralConfig", dict(head_dim=16, sliding_window=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(head_dim=32, sliding_window=16)),  # Gemma ties by default
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=32, **SLIDING)),
    "phi3": ("Phi3Config", dict(partial_rotary_factor=0.5, tie_word_embeddings=True)),  # Phi-4-mini
    "olmo2": ("Olmo2Config", {}),
    "smollm3": ("SmolLM3Config", dict(no_rope_layer_interval=2, tie_word_embeddings=True)),
    "granite": ("GraniteConfig", dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.05,
                                      logits_scaling=8.0, tie_word_embeddings=True)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(**EXPERTS, head_dim=16)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(**EXPERTS, shared_expert_intermediate_size=48, head_dim=16)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, head_dim=16)),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32, head_dim=16)),
    "glm4_moe": ("Glm4MoeConfig", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                       first_k_dense_replace=1, n_group=4, topk_group=2, n_shared_experts=1,
                                       head_dim=16)),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, head_dim=16,
                                     **SLIDING)),
    "qwen3_5_text": ("Qwen3_5TextConfig", dict(**LINEAR, tie_word_embeddings=True)),
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", dict(**LINEAR, **EXPERTS, shared_expert_intermediate_size=48)),
    "qwen3_next": ("Qwen3NextConfig", dict(**LINEAR, **EXPERTS, shared_expert_intermediate_size=48)),
    "olmo3": ("Olmo3Config", dict(**SLIDING)),
    "ministral3": ("Ministral3Config", dict(head_dim=16)),
    "gemma4_text": ("Gemma4TextConfig", dict(head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                                             attention_k_eq_v=True, num_kv_shared_layers=0, **SLIDING,
                                             hidden_size_per_layer_input=8, vocab_size_per_layer_input=1032)),
    "gemma3": ("Gemma3Config", dict(text_config=dict(head_dim=32, **SLIDING), mm_tokens_per_image=4,
                                    image_token_index=1026, vision_config=dict(
                                        hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8))),
    "qwen3_5": ("Qwen3_5Config", dict(text_config=dict(LINEAR), vision_config=dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
        num_position_embeddings=16))),
    "mistral3": ("Mistral3Config", dict(  # Ministral 3 as published: its language model beside a Pixtral tower
        text_config=dict(model_type="ministral3", head_dim=16), image_token_index=1026, vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
            patch_size=8, head_dim=16))),
    "gemma4": ("Gemma4Config", dict(  # vision and audio towers
        text_config=dict(head_dim=16, global_head_dim=32, hidden_size_per_layer_input=8,
                         vocab_size_per_layer_input=1032, **SLIDING),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16),
        audio_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, output_proj_dims=32,
                          subsampling_conv_channels=[8, 4]),
        image_token_id=1026, audio_token_id=1027, boi_token_id=1028, eoi_token_id=1029, boa_token_id=1030,
        eoa_token_index=1031, video_token_id=1031)),  # ids past the template's tokens (the vocabulary is padded)
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    """sftplug's tokenizer.json with the template's special tokens, as a transformers 5 tokenizer."""
    backend = tokenizers.Tokenizer.from_file(str(ASSETS / "tokenizer.json"))
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in EXTRA_SPECIAL_TOKENS])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        extra_special_tokens=EXTRA_SPECIAL_TOKENS, chat_template=TEMPLATE)
    assert tokenizer.convert_tokens_to_ids("<|end_of_turn|>") == END_OF_TURN
    return tokenizer


def save_as_downloaded(folder, family: str, hf_tokenizer):
    """The folder a download of ``family`` is: transformers' save_pretrained of model (bf16, sharded) and tokenizer."""
    config_class, options = FAMILIES[family]
    options = json.loads(json.dumps(options))  # transformers edits nested dicts in place
    if "text_config" in options:
        config = getattr(transformers, config_class)(**{**options, "text_config": {**TEXT, **options["text_config"]}})
    else:
        config = getattr(transformers, config_class)(**{**TEXT, **options})
    torch.manual_seed(0)
    # transformers registers Mistral 3's full model for image-text-to-text only
    auto = transformers.AutoModelForImageTextToText if family == "mistral3" else transformers.AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=EOS_IDS, pad_token_id=0,
                                                            do_sample=True, temperature=0.6, top_p=0.9)
    model.save_pretrained(folder, max_shard_size="100KB")
    hf_tokenizer.save_pretrained(folder)
    return model


def stored_keys(folder) -> set[str]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return set(index["weight_map"])


def train_from(tmp_path, base):
    """One full update through the CLI: the tied embedding changes, and stays tied if it does."""
    data, held_out = tmp_path / "chats.jsonl", tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS))
    # a text record held out: the run then answers no sample prompt (64 greedy tokens, seconds per family)
    held_out.write_text(json.dumps({"text": "Red and blue."}) + "\n")
    result = CliRunner().invoke(cli, ["train", "--model", str(base), "--data", str(data), "--eval-data",
                                      str(held_out), "--out", str(tmp_path / "run"), "--full", "--steps", "1",
                                      "--micro-bsz", "2", "--seq-len", "48", "--lr", "1e-2", "--warmup", "0"])
    assert result.exit_code == 0, result.output
    return tmp_path / "run", result.output


def trained_segments(tokenizer: Tokenizer, chat: list[dict]) -> list[list[int]]:
    """The runs of consecutive trained tokens of one conversation, as the run tokenizes it."""
    [(text, spans)], without_eos = tokenizer.render_spans(chat)
    assert without_eos == 0
    ids, trained, _ = tokenizer.encode_masked([text], [spans])
    segments, previous = [], False
    for token, flag in zip(ids.tolist(), trained.tolist()):
        if flag and not previous:
            segments.append([])
        if flag:
            segments[-1].append(token)
        previous = flag
    return segments


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_downloaded_folder_trains_and_exports_as_it_came(tmp_path, family, hf_tokenizer):
    base = tmp_path / "download"
    reference = save_as_downloaded(base, family, hf_tokenizer)
    source_keys = stored_keys(base)
    tied = reference.config.tie_word_embeddings  # a folder with towers: the outer config ties (as transformers)
    assert json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"] > 0
    shards = len(list(base.glob("model-*-of-*.safetensors")))
    assert shards >= 2 and tied == (not any(k.endswith("lm_head.weight") for k in source_keys))

    # the folder's template, rendered to the tokens transformers renders, and turns ending with its end of turn
    tokenizer = Tokenizer(base)
    assert tokenizer.template_source == "chat_template.jinja" and tokenizer.stop_ids == tuple(EOS_IDS)
    hf = transformers.AutoTokenizer.from_pretrained(str(base))
    for chat in CHATS[:2]:
        assert tokenizer.encode(tokenizer.render(chat)) == hf.apply_chat_template(chat, return_dict=False)
        prompt = chat[:-1]
        assert tokenizer.encode(tokenizer.render(prompt, add_generation_prompt=True)) == hf.apply_chat_template(
            prompt, add_generation_prompt=True, return_dict=False)
        turns = [m["content"] for m in chat if m["role"] == "assistant"]
        assert [tokenizer.decode(s, skip_special_tokens=False) for s in trained_segments(tokenizer, chat)] == [
            t + "<|end_of_turn|>" for t in turns]  # not the "\n" the template puts after it

    # bf16 weights read in the dtype asked for, exactly
    loaded = load_model(str(base), dtype=torch.float32, attention=None)
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(loaded.model.embed_tokens.weight, reference.get_input_embeddings().weight.float())

    run, output = train_from(tmp_path, base)
    assert "chat template: chat_template.jinja" in output and "do not end with EOS" not in output
    assert f"fp32, {shards} files)" in output  # --dtype auto on the CPU

    trained = load_model(str(run), dtype=torch.float32, attention=None).model
    embedding = trained.embed_tokens.weight
    assert not torch.equal(embedding, loaded.model.embed_tokens.weight)  # the update reached it
    assert (trained.lm_head.weight is embedding) == tied

    exported = export_checkpoint(run, tmp_path / "export")["model"]
    config = json.loads((exported / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] == tied
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tied)  # stored once where the source stored it once
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), embedding.to(torch.bfloat16))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(exported))
    assert (hf_model.lm_head.weight.data_ptr() == hf_model.get_input_embeddings().weight.data_ptr()) == tied

    # the tokenizer files and the EOS list kept, so the export renders and stops as the download did
    for name in ("chat_template.jinja", "tokenizer.json"):
        assert (exported / name).read_text() == (base / name).read_text()
    tokenizer_config = json.loads((exported / "tokenizer_config.json").read_text())
    assert tokenizer_config["extra_special_tokens"] == EXTRA_SPECIAL_TOKENS
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == EOS_IDS
    assert transformers.AutoTokenizer.from_pretrained(str(exported)).apply_chat_template(
        CHATS[0], return_dict=False) == hf.apply_chat_template(CHATS[0], return_dict=False)


class ForcedAt(torch.nn.Module):
    """A model whose call ``at`` (0-based) chooses ``token``: where a greedy continuation reaches it."""

    def __init__(self, model, token: int, at: int):
        super().__init__()
        self.model, self.token, self.at, self.calls = model, token, at, 0
        self.layers = model.layers

    def forward(self, ids, positions, caches):
        logits = self.model(ids, positions, caches=caches)
        if self.calls == self.at:
            logits[..., self.token] = logits.max() + 1
        self.calls += 1
        return logits


@pytest.mark.parametrize("stop", EOS_IDS)
def test_generation_stops_at_each_eos_id_of_generation_config(tmp_path, hf_tokenizer, stop):
    save_as_downloaded(tmp_path, "llama", hf_tokenizer)
    loaded = load_model(str(tmp_path), dtype=torch.float32)
    tokenizer = loaded.tokenizer
    prompt = tokenizer.render([{"role": "user", "content": "Say hi."}], add_generation_prompt=True)
    free = generate_ids(loaded.model, tokenizer.encode(prompt), 4, eos_id=None)
    assert stop not in free[:3]  # the forced stop is what ends it
    assert generate_ids(ForcedAt(loaded.model, stop, 3), tokenizer.encode(prompt), 8, tokenizer.stop_ids) == free[:3]
    assert answer(ForcedAt(loaded.model, stop, 3), tokenizer, "Say hi.") == tokenizer.decode(free[:3]).strip()
