"""``sftplug data preview``: the marked records, the statistics, one-line errors."""

import json
import re
import shutil

import pytest
from click.testing import CliRunner

from sftplug.cli import cli
from sftplug.config import ASSETS
from sftplug.data.prepare import prepare_data
from sftplug.data.preview import CLOSE, OPEN, stats_lines
from sftplug.data.tokenizer import Tokenizer

CHAT = {"messages": [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Green."},
    {"role": "user", "content": "And a fruit?"},
    {"role": "assistant", "content": "A pear."},
]}  # fmt: skip
QA = [{"question": "What is 2+2?", "answer": "4."}, {"question": "Hi?", "answer": "Hello."}]


def invoke(*args):
    return CliRunner().invoke(cli, ["data", "preview", *map(str, args)])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def marked(text):
    return re.findall(f"{OPEN}(.*?){CLOSE}", text, flags=re.S)


def test_preview_marks_trained_text_and_prints_prepare_datas_stats(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT, CHAT, CHAT])
    result = invoke("--data", path, "--seq-len", 170, "--chat-template", "chatml", "-n", 2)  # each record: 182 tokens
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "model: tiny; chat template: built-in 'chatml'"
    assert [line for line in lines if line.startswith("--- ")] == [
        *(f"--- {path}:{n} (171 tokens, 31 trained, 11 more cut by --seq-len)" for n in (1, 2)), "--- statistics"]
    # not a terminal: brackets, no colour; <|im_end|> is not the bundled tokenizer's EOS, so its newline is trained
    assert "\x1b[" not in result.output
    assert marked(result.output) == ["Blue.<|im_end|>\n", "Green.<|im_end|>\n", "A pear"] * 2
    tok = Tokenizer(ASSETS)
    tok.set_chat_template("chatml")
    expected = stats_lines(prepare_data(tok, data=path, seq_len=170))
    assert lines[-len(expected) - 1 :] == ["--- statistics", *expected]
    assert expected[0] == "records: 3 (chat)" and "truncated: 3;" in expected[3]


def test_colour_on_request(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT])
    result = invoke("--data", path, "-n", 1, "--color")
    assert result.exit_code == 0, result.output
    assert "\x1b[32mBlue.<|eos|>\x1b[0m" in result.output and OPEN not in result.output


def test_field_map_and_other_sources(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(QA), path)
    result = invoke("--data", path, "--field-map", "question=prompt,answer=completion", "-n", 5)
    assert result.exit_code == 0, result.output
    assert marked(result.output) == ["4.<|eos|>", "Hello.<|eos|>"]
    assert f"--- {path}:2 (" in result.output and "records: 2 (prompt)" in result.output


def test_model_folders_and_checkpoints_give_their_tokenizer(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / name, folder)
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT])
    assert invoke("--model", folder, "--data", path).exit_code == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "step-1"
    checkpoint.mkdir(parents=True)
    (checkpoint.parent / "latest").write_text("step-1")
    manifest = {"format": "sftplug-checkpoint", "files": {}, "step": 1, "base_model": str(folder),
                "config": {"chat_template": "chatml"}}  # weights are never read
    (checkpoint / "run.json").write_text(json.dumps(manifest))
    result = invoke("--model", tmp_path / "run", "--data", path, "-n", 1)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"model: {tmp_path / 'run'}; chat template: built-in 'chatml'")
    assert "<|im_start|>" in result.output


def test_the_header_says_where_the_template_came_from_and_warns_without_one(tmp_path):
    from transformers import AutoTokenizer

    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT])
    hf = AutoTokenizer.from_pretrained(ASSETS)
    hf.save_pretrained(tmp_path / "model")  # transformers 5's layout: the template in chat_template.jinja
    result = invoke("--model", tmp_path / "model", "--data", path, "-n", 1)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"model: {tmp_path / 'model'}; chat template: chat_template.jinja\n")
    assert marked(result.output) == ["Blue.<|eos|>", "Green.<|eos|>", "A pear.<|eos|>"]
    assert "warning" not in result.output

    hf.chat_template = None
    hf.save_pretrained(tmp_path / "bare")
    result = invoke("--model", tmp_path / "bare", "--data", path, "-n", 1)
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first == f"model: {tmp_path / 'bare'}; chat template: built-in 'sftplug' (the model has none)"
    [warning] = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert warning.startswith(f"warning: {tmp_path / 'bare'} has no chat template (chat_template.jinja, ")
    assert "built-in 'sftplug' template" in warning and "--chat-template" in warning
    described = prepare_data(Tokenizer(tmp_path / "bare"), data=path, seq_len=64).describe()  # train's data line
    assert "; chat template: built-in 'sftplug' (the model has none); " + warning in described
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "Plain text."}])  # no template is used: no warning
    assert "warning" not in invoke("--model", tmp_path / "bare", "--data", text).output


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/missing.jsonl"], "missing.jsonl: data file not found"),
    (["--format", "csv"], "--format must be one of auto, chat, prompt, alpaca, text, got 'csv'"),
    (["--field-map", "question"], "--field-map question: expected FIELD=NAME pairs"),
    (["--model", "{tmp}/nowhere"], "--model {tmp}/nowhere: not a preset (tiny, w0, w1, w0-moe, w1-moe, w0-hybrid)"),
    (["--model", "{tmp}"], "no tokenizer.json"),
    (["--data", "{tmp}/bad.jsonl"], "bad.jsonl:2: invalid JSON"),
    (["--chat-template", "nosuch"], "--chat-template nosuch: no such file and not a built-in template"),
    (["-n", "-1"], "Invalid value for '-n' / '--records'"),
])  # fmt: skip
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    write_jsonl(tmp_path / "bad.jsonl", [CHAT]).open("a").write("{not json\n")
    result = invoke(*(a.format(tmp=tmp_path) for a in args))
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and message.format(tmp=tmp_path) in error[0], result.output
    assert "Traceback" not in result.output
