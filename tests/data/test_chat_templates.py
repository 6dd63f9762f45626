"""Real models' chat templates (tests/fixtures/chat_templates) train exactly the assistant turns.

Each conversation goes through sftplug's tokenizing path with the bundled tokenizer (the
template's markers added as tokens, as the models have them), and is checked token by
token against what transformers' ``apply_chat_template`` renders: every trained run of
tokens is one assistant turn as the template renders it when that turn is generated,
through its end-of-turn token, and everything before it is exactly the generation prompt
``apply_chat_template(messages[:k], add_generation_prompt=True)``.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sftplug.config import ASSETS
from sftplug.data.prepare import prepare_data
from sftplug.data.records import BadLog, BadRecord, to_messages
from sftplug.data.tokenizer import Tokenizer
from sftplug.data.tokenizing import tokenize_records

TEMPLATES = Path(__file__).parents[1] / "fixtures" / "chat_templates"

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And a fruit?"},
    {"role": "assistant", "content": "A pear, ripe."},
    {"role": "user", "content": "A number?"},
    {"role": "assistant", "content": "Seven 😀"},
]
REASONING = "The user wants a fruit.\nPear is one."

# Per model: its special tokens, end-of-turn (EOS) token, the conversation, each assistant
# turn's trained text as the template renders it when generated, and the examples' turns.
MODELS = {
    "qwen3": dict(
        bos=None, eos="<|im_end|>", specials=["<|im_start|>", "<|im_end|>"], added=["<think>", "</think>"],
        chat=CHAT[:4] + [dict(CHAT[4], reasoning_content=REASONING)] + CHAT[5:],
        turns=["<think>\n\n</think>\n\nRed.<|im_end|>",
               f"<think>\n{REASONING}\n</think>\n\nA pear, ripe.<|im_end|>",
               "<think>\n\n</think>\n\nSeven 😀<|im_end|>"],
        groups=[[0], [1], [2]],  # Qwen3 drops earlier turns' <think> blocks: one example per turn
    ),
    "llama3.1": dict(
        bos="<|begin_of_text|>", eos="<|eot_id|>", added=[],
        specials=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        chat=CHAT, turns=["Red.<|eot_id|>", "A pear, ripe.<|eot_id|>", "Seven 😀<|eot_id|>"], groups=[[0, 1, 2]],
    ),
    "gemma3": dict(
        bos="<bos>", eos="<end_of_turn>", specials=["<bos>", "<start_of_turn>", "<end_of_turn>"], added=[],
        chat=CHAT, turns=["Red.<end_of_turn>", "A pear, ripe.<end_of_turn>", "Seven 😀<end_of_turn>"],
        groups=[[0, 1, 2]],  # the system prompt joins the first user turn
    ),
    "phi4": dict(
        bos=None, eos="<|im_end|>", specials=["<|im_start|>", "<|im_sep|>", "<|im_end|>"], added=[],
        chat=CHAT, turns=["Red.<|im_end|>", "A pear, ripe.<|im_end|>", "Seven 😀<|im_end|>"], groups=[[0, 1, 2]],
    ),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per model: a tokenizer folder saved by transformers (the bundled tokenizer, the model's markers and
    template: today's layout, the template in chat_template.jinja), sftplug's and HF's tokenizer of it."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    made = {}
    for name, spec in MODELS.items():
        folder = tmp_path_factory.mktemp(name)
        backend = Backend.from_file(str(ASSETS / "tokenizer.json"))
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["specials"]])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["added"]])
        PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=spec["bos"], eos_token=spec["eos"],
                                pad_token=spec["eos"],
                                chat_template=(TEMPLATES / f"{name}.jinja").read_text()).save_pretrained(folder)
        made[name] = (folder, Tokenizer(folder), AutoTokenizer.from_pretrained(folder))
    return made


def test_fixtures_are_the_shipped_templates():
    assert sorted(p.name for p in TEMPLATES.glob("*.jinja")) == ["gemma3.jinja", "llama3.1.jinja", "phi4.jinja",
                                                                 "qwen3.jinja"]
    readme = (TEMPLATES / "README.md").read_text()
    for name in ("Qwen/Qwen3-0.6B", "meta-llama/Llama-3.1-8B-Instruct", "microsoft/phi-4", "google/gemma-3-4b-it"):
        assert name in readme


@pytest.mark.parametrize("name", MODELS)
def test_the_template_is_read_from_chat_template_jinja(models, name):
    folder, tok, _ = models[name]
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
    assert tok.template_source == "chat_template.jinja" and tok.template_warning is None
    assert tok.chat_template == (TEMPLATES / f"{name}.jinja").read_text()


def examples_of(tok, path, train_turns="all"):
    """(ids, trained) per example of the file's records, and each example's record, via training's path."""
    bad = BadLog(skip=False)
    records = ((n, json.loads(line)) for n, line in enumerate(path.read_text().splitlines(), 1))
    docs, _, _, owners = tokenize_records(path, records, tok, "chat", False, bad, train_turns)
    ids, trained, s = docs.ids.tolist(), docs.trained.tolist(), docs.starts.tolist()
    return [(ids[a:b], trained[a:b]) for a, b in zip(s[:-1], s[1:])], owners.tolist()


def runs(trained: list[bool]) -> list[tuple[int, int]]:
    """The (start, end) token ranges of consecutive trained tokens."""
    out, start = [], None
    for k, flag in enumerate(trained + [False]):
        if flag and start is None:
            start = k
        elif not flag and start is not None:
            out.append((start, k))
            start = None
    return out


def check_example(hf, chat, ids, trained, turns):
    """Token by token: the trained runs are exactly ``turns`` (assistant turn indexes), each after HF's prompt."""
    decode = lambda part: hf.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    text = decode(ids)
    assert hf(text, add_special_tokens=False)["input_ids"] == ids  # the example is its text, tokenized plainly
    positions = [i for i, m in enumerate(chat) if m["role"] == "assistant"]
    got = runs(trained)
    assert len(got) == len(turns), (text, [decode(ids[a:b]) for a, b in got])
    for (a, b), turn in zip(got, turns):
        k = positions[turn]
        prompt = hf.apply_chat_template(chat[:k], add_generation_prompt=True, tokenize=False)
        rendered = hf.apply_chat_template(chat[: k + 1], tokenize=False)
        assert decode(ids[:a]) == prompt  # the context is what the template shows when turn k is generated
        assert rendered.startswith(decode(ids[:b]))
        yield decode(ids[a:b])


@pytest.mark.parametrize("name", MODELS)
def test_real_template_trains_exactly_the_assistant_turns(models, tmp_path, name):
    spec, (_, tok, hf) = MODELS[name], models[name]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": spec["chat"]}) + "\n")
    examples, owners = examples_of(tok, path)
    assert owners == [0] * len(spec["groups"])  # one record, this many examples
    trained_texts = []
    for (ids, trained), group in zip(examples, spec["groups"], strict=True):
        trained_texts += list(check_example(hf, spec["chat"], ids, trained, group))
    assert trained_texts == spec["turns"]  # each assistant turn once, with its end-of-turn token
    if name == "llama3.1":  # its dated system header is context, never trained
        assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou answer briefly." in hf.decode(
            examples[0][0])


@pytest.mark.parametrize("name", MODELS)
def test_train_turns_last_trains_only_the_final_turn(models, tmp_path, name):
    spec, (_, tok, hf) = MODELS[name], models[name]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": spec["chat"][:n]}) + "\n" for n in (3, 7)))
    examples, owners = examples_of(tok, path, train_turns="last")
    assert owners == [0, 1]  # one example per record
    assert list(check_example(hf, spec["chat"][:3], *examples[0], [0])) == spec["turns"][:1]
    assert list(check_example(hf, spec["chat"], *examples[1], [2])) == spec["turns"][2:]


@pytest.mark.parametrize("name", MODELS)
def test_a_model_folder_trains_on_its_chat_template_jinja_and_exports_it(models, tmp_path, name, make_hf_folder):
    """`train` on a model folder saved by transformers 5 uses its chat_template.jinja (the header says so) with the
    tokens and masks checked above; the export holds that template once, and transformers renders it."""
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from sftplug.cli import cli

    spec, (folder, tok, _) = MODELS[name], models[name]
    base = tmp_path / "base"
    make_hf_folder(base, vocab_size=tok.vocab_size, max_position_embeddings=1024)
    for path in folder.iterdir():  # the model's own tokenizer, as transformers saved it
        shutil.copy(path, base)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": spec["chat"]}) + "\n")
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--model", str(base), "--data", str(data), "--out", str(run),
                                      "--steps", "1", "--micro-bsz", "1", "--seq-len", "512", "--full"])
    assert result.exit_code == 0, result.output
    assert "chat template: chat_template.jinja" in result.output and "warning" not in result.output
    [entry] = (run / "cache").glob("data-*")  # what the run trained on: the examples checked token by token
    examples, _ = examples_of(tok, data)
    assert np.fromfile(entry / "ids.bin", np.int32).tolist() == [i for ids, _ in examples for i in ids]
    assert np.fromfile(entry / "trained.bin", np.bool_).tolist() == [t for _, flags in examples for t in flags]

    out = tmp_path / "hf"
    result = CliRunner().invoke(cli, ["export", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "chat_template.jinja").read_text() == tok.chat_template
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    exported = AutoTokenizer.from_pretrained(out)
    chat = spec["chat"]
    for k in (k for k, message in enumerate(chat) if message["role"] == "assistant"):  # each turn as trained
        assert exported.apply_chat_template(chat[:k], add_generation_prompt=True, tokenize=False) == tok.render(
            chat[:k], add_generation_prompt=True)
        assert exported.apply_chat_template(chat[:k + 1], tokenize=False) == tok.render(chat[:k + 1])


def test_prepare_data_counts_records_and_examples_and_keeps_them_together(models, tmp_path):
    _, tok, _ = models["qwen3"]
    path = tmp_path / "chat.jsonl"
    chats = [[dict(m, content=f"{m['content']} ({n})") for m in CHAT] for n in range(10)]
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    prepared = prepare_data(tok, data=path, seq_len=256, pack=False, eval_split=0.3)
    s = prepared.stats
    assert (s.records, s.eval_records, s.examples, s.eval_examples) == (7, 3, 21, 9)
    assert "7 chat records as 21 examples" in prepared.describe()
    examples, _ = examples_of(tok, path)
    # Every trained token is a target (none starts an example); the split moves whole conversations.
    assert s.target_tokens + s.eval_target_tokens == sum(sum(trained) for _, trained in examples)
    last = prepare_data(tok, data=path, seq_len=256, pack=False, train_turns="last").stats
    assert (last.records, last.examples) == (10, 10)



def test_reasoning_content_is_checked():
    chat = [CHAT[1], dict(CHAT[2], reasoning_content="Why red.")]
    assert to_messages({"messages": chat}, "chat")[1]["reasoning_content"] == "Why red."
    for bad in ([dict(CHAT[1], reasoning_content="x"), CHAT[2]], [CHAT[1], dict(CHAT[2], reasoning_content=3)]):
        with pytest.raises(BadRecord, match="reasoning_content must be a string on an assistant message"):
            to_messages({"messages": bad}, "chat")
