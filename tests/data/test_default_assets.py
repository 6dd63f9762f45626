"""Tests for the bundled default dataset and tokenizer (sftplug/assets).

They import the generator by path and need only `tokenizers` and `transformers`,
not the sftplug package itself.
"""

import importlib.util
import json
import shutil
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "sftplug" / "assets"
GENERATOR = ROOT / "scripts" / "make_default_assets.py"
ASSET_FILES = ["default_train.jsonl", "default_eval.jsonl", "tokenizer.json", "tokenizer_config.json"]
SPECIAL_IDS = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, "<|user|>": 3, "<|assistant|>": 4, "<|system|>": 5}


def load_generator():
    spec = importlib.util.spec_from_file_location("make_default_assets", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(name):
    with open(ASSETS / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def train():
    return read_jsonl("default_train.jsonl")


@pytest.fixture(scope="module")
def evals():
    return read_jsonl("default_eval.jsonl")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(ASSETS / "tokenizer.json"))


def test_generator_reproduces_assets_byte_for_byte(tmp_path):
    load_generator().generate(tmp_path)
    for name in ASSET_FILES:
        assert (tmp_path / name).read_bytes() == (ASSETS / name).read_bytes(), name


@pytest.mark.parametrize("name, count", [("default_train.jsonl", 3000), ("default_eval.jsonl", 200)])
def test_records_are_valid(name, count):
    lines = (ASSETS / name).read_text(encoding="utf-8").splitlines()
    assert len(lines) == count
    for line in lines:
        record = json.loads(line)
        assert set(record) == {"prompt", "completion"}
        for value in record.values():
            assert isinstance(value, str) and value == value.strip() and value
            assert "<|" not in value and "\n" not in value


def test_eval_prompts_are_not_in_train(train, evals):
    train_prompts = {r["prompt"] for r in train}
    assert not [r["prompt"] for r in evals if r["prompt"] in train_prompts]
    assert len({r["prompt"] for r in evals}) == len(evals)


def test_first_eval_record_is_the_sample(evals):
    assert evals[0] == {"prompt": "Count from 4 to 9.", "completion": "4, 5, 6, 7, 8, 9."}


def test_answers_follow_their_rules(train, evals):
    for r in train + evals:
        p, c = r["prompt"], r["completion"]
        if "plus" in p or p.startswith("Add "):
            a, b = [int(w) for w in p.rstrip("?.").replace(" and ", " plus ").split() if w.isdigit()]
            assert c == f"{a} plus {b} is {a + b}."
        elif "ount from" in p or "numbers from" in p:
            a, b = [int(w) for w in p.rstrip(".").split() if w.isdigit()]
            assert c == ", ".join(str(i) for i in range(a, b + 1)) + "."


def test_special_token_ids(tokenizer):
    for token, i in SPECIAL_IDS.items():
        assert tokenizer.token_to_id(token) == i
        assert tokenizer.id_to_token(i) == token
    assert tokenizer.get_vocab_size() == 1024


@pytest.mark.parametrize("text", [
    "Count from 4 to 9.",
    "What is 12 plus 7? 12 plus 7 is 19.",
    "Hello,  World!\n\tUnseen wörds: naïve café 🙂 1234567890",
])
def test_tokenizer_round_trips_text(tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text


def test_digits_are_single_tokens(tokenizer):
    tokens = tokenizer.encode("12 plus 345").tokens
    assert [t for t in tokens if any(ch.isdigit() for ch in t)] == ["1", "2", "3", "4", "5"]


def test_specials_encode_as_single_tokens(tokenizer):
    ids = tokenizer.encode("<|bos|><|user|>\nHi\n<|assistant|>\nYo<|eos|>\n").ids
    assert ids[:2] == [1, 3] and 4 in ids and 2 in ids
    assert tokenizer.encode("Hi").ids[0] not in SPECIAL_IDS.values()  # nothing is prepended


def test_records_are_short_in_tokens(tokenizer, train, evals):
    lengths = [len(tokenizer.encode(r["prompt"]).ids) + len(tokenizer.encode(r["completion"]).ids)
               for r in train + evals]
    assert 15 <= statistics.mean(lengths) <= 30
    assert max(lengths) <= 45


def test_transformers_loads_tokenizer_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    for name in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(ASSETS / name, tmp_path / name)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.model_max_length == 512

    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Count from 4 to 9."},
            {"role": "assistant", "content": "4, 5, 6, 7, 8, 9."}]
    rendered = tok.apply_chat_template(chat, tokenize=False)
    assert rendered == ("<|bos|><|system|>\nBe brief.\n<|user|>\nCount from 4 to 9.\n"
                        "<|assistant|>\n4, 5, 6, 7, 8, 9.<|eos|>\n")
    prompt = tok.apply_chat_template(chat[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|user|>\nCount from 4 to 9.\n<|assistant|>\n"

    # The generator's own rendering (used to train the BPE) matches the template.
    record = {"prompt": "Count from 4 to 9.", "completion": "4, 5, 6, 7, 8, 9."}
    full = tok.apply_chat_template([{"role": "user", "content": record["prompt"]},
                                    {"role": "assistant", "content": record["completion"]}],
                                   tokenize=False)
    assert full == load_generator().render_chat(record)

    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [1, 3] and ids[-2] == 4
    assert tok.decode(ids) == prompt
