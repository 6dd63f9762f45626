"""Every option is declared once (TrainConfig's fields) and checked once, in TrainConfig."""

import dataclasses

import pytest
from click.testing import CliRunner

from sftplug.cli import cli
from sftplug.config import DEFAULT_EVAL, TrainConfig
from sftplug.errors import SftplugError


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(dtype="fp8"), "--dtype must be one of auto, bf16, fp16, fp32, got 'fp8'"),
        (dict(strategy="tp"), "--strategy must be ddp or fsdp, got 'tp'"),
        (dict(format="csv"), "--format must be one of auto, chat, prompt, alpaca, text, got 'csv'"),
        (dict(overlong="wrap"), "--overlong must be truncate or drop, got 'wrap'"),
        (dict(steps=0), "--steps must be at least 1, got 0"),
        (dict(seq_len=0), "--seq-len must be at least 1, got 0"),
        (dict(warmup=-1), "--warmup must not be negative"),
        (dict(lr=0.0), "--lr must be positive, got 0.0"),
        (dict(min_lr_ratio=1.5), r"--min-lr-ratio must be in \[0, 1\], got 1.5"),
        (dict(lora_dropout=1.0), r"--lora-dropout must be in \[0, 1\), got 1.0"),
        (dict(eval_split=1.5), r"--eval-split must be a fraction in \[0, 1\), got 1.5"),
        (dict(eval_split=0.1, eval_data="held-out.jsonl"), "use --eval-split or --eval-data, not both"),
        (dict(quantize="nf4", full=True), "--quantize nf4 keeps the frozen base quantized under LoRA adapters"),
        (dict(quantize="int8"), "--quantize must be one of none, nf4, fp4, got 'int8'"),
        (dict(optimizer="sgd"), "--optimizer must be one of adamw, adamw8bit, paged_adamw, paged_adamw8bit"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_option(bad, message):
    with pytest.raises(SftplugError, match=f"^{message}"):
        TrainConfig(**bad)


def test_every_field_is_an_option_with_its_default_and_help():
    params = {p.name: p for p in cli.commands["train"].params}
    for f in dataclasses.fields(TrainConfig):
        option = params[f.name]
        assert option.help == f.metadata["help"]
        default = ", ".join(f.default) if isinstance(f.default, tuple) else f.default  # as help shows a list
        assert option.default == default, f.name
    assert set(params) == {f.name for f in dataclasses.fields(TrainConfig)} | {"nproc", "config_file", "print_config"}


def test_the_command_line_gives_the_config_the_api_gives(monkeypatch):
    seen = {}

    def capture(config, registry, echo):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr("sftplug.train.loop.train", capture)
    result = CliRunner().invoke(cli, ["train", "--steps", "7", "--no-pack", "--lora-targets", "qkv, o", "--full"])
    assert result.exit_code == 0, result.output
    assert seen["config"] == TrainConfig(steps=7, pack=False, lora_targets=("qkv", "o"), full=True)
    assert TrainConfig().eval_data == str(DEFAULT_EVAL)  # the bundled held-out file with the bundled data
    assert TrainConfig(data="mine.jsonl").eval_data is None


def test_a_logger_named_twice_opens_once():
    assert TrainConfig(log_to=("tensorboard", "wandb", "tensorboard")).log_to == ("tensorboard", "wandb")
