import json

import pytest
from click.testing import CliRunner

import sftplug
from sftplug.cli import cli

SMALL = ["--steps", "4", "--micro-bsz", "2", "--seq-len", "64", "--log-every", "2"]


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def test_help_and_version():
    result = invoke("-h")
    assert result.exit_code == 0
    assert "Examples:" in result.output and "train" in result.output
    assert invoke("--version").output.strip().endswith(sftplug.__version__)
    assert "--attention" in invoke("train", "-h").output


def test_plugins_json_lists_builtins_with_availability():
    result = invoke("plugins", "--json")
    assert result.exit_code == 0
    plugins = {p["name"]: p for p in json.loads(result.output)}
    assert plugins["math"]["available"] and plugins["math"]["source"] == "builtin"
    for p in plugins.values():
        assert set(p) == {"name", "source", "hooks", "available", "reason"}
        assert p["available"] or p["reason"]


def test_plugins_table_has_a_header_over_its_columns():
    result = invoke("plugins")
    assert result.exit_code == 0
    header, *rows = result.output.splitlines()
    assert header.split() == ["PLUGIN", "STATUS", "SOURCE", "HOOKS"]
    math = next(row for row in rows if row.startswith("math "))
    assert [math.index(value) for value in ("ok", "builtin", "select_attention")] == [
        header.index(title) for title in ("STATUS", "SOURCE", "HOOKS")
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attention", "warp-drive"], "unknown attention backend 'warp-drive'"),
        (["--dtype", "fp8"], "--dtype must be one of auto, bf16, fp16, fp32, got 'fp8'"),
        (["--data", "/nonexistent/data.jsonl"], "/nonexistent/data.jsonl: data file not found"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--lora-targets", "qkv,wq"], "no linear layer named wq"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    result = invoke("train", "--out", str(tmp_path / "run"), *SMALL, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith(("Error", "Usage"))]) >= 1


def test_non_writable_out_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = invoke("train", "--out", str(blocker / "run"), *SMALL)
    assert result.exit_code == 2
    assert f"--out {blocker / 'run'}: cannot create the folder" in result.output
    assert blocker.read_text() == "not a folder"


def test_train_then_generate(tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "--out", str(out), *SMALL)
    assert result.exit_code == 0, result.output
    assert "attention: flash (auto" in result.output
    assert "held-out loss:" in result.output and "answer after:" in result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]  # step 0: the held-out loss before training
    for r in records[1:]:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tps"} <= set(r)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-4"
    assert (out / "checkpoints" / "step-4" / "model.safetensors").is_file()
    # the checkpoint, loaded again, answers exactly as the trained model did
    summary = json.loads((out / "summary.json").read_text())
    generated = invoke("generate", str(out), summary["sample_prompt"])
    assert generated.exit_code == 0, generated.output
    assert generated.output.strip() == summary["answer_after"]


def test_generate_on_a_folder_that_is_no_checkpoint(tmp_path):
    result = invoke("generate", str(tmp_path), "hello")
    assert result.exit_code == 2
    assert "not a built-in preset" in result.output


@pytest.mark.slow
def test_python_dash_m_works():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "sftplug", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and sftplug.__version__ in result.stdout


def test_export_command(tmp_path):
    out = tmp_path / "run"
    assert invoke("train", "--out", str(out), *SMALL).exit_code == 0
    merged = invoke("export", str(out), "--out", str(tmp_path / "merged"))
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / "model.safetensors").is_file()
    split = invoke("export", str(out), "--out", str(tmp_path / "split"), "--adapter")
    assert split.exit_code == 0, split.output
    assert (tmp_path / "split" / "adapter" / "adapter_config.json").is_file()
    again = invoke("export", str(out), "--out", str(tmp_path / "merged"))
    assert again.exit_code == 2 and "Traceback" not in again.output


def test_export_keeps_the_chat_template_the_run_trained_with(tmp_path):
    from transformers import AutoTokenizer

    from sftplug.data.chat_templates import BUILTIN_TEMPLATES

    out = tmp_path / "run"
    assert invoke("train", "--out", str(out), *SMALL, "--chat-template", "chatml").exit_code == 0
    assert invoke("export", str(out), "--out", str(tmp_path / "hf")).exit_code == 0
    exported = tmp_path / "hf"
    assert (exported / "chat_template.jinja").read_text() == BUILTIN_TEMPLATES["chatml"]  # transformers 5's place
    assert "chat_template" not in json.loads((exported / "tokenizer_config.json").read_text())  # and only there
    chat = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    rendered = AutoTokenizer.from_pretrained(exported).apply_chat_template(chat, tokenize=False)
    assert rendered == "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
