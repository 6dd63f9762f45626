"""Config files: every key checked for its name, type and value, each error one line naming file and key."""

import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from sftplug.config import TrainConfig
from sftplug.config_file import KEYS, dump_config, load_config, read_config_file
from sftplug.errors import SftplugError

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_keys_in_either_spelling_lists_and_numbers(tmp_path):
    path = write(tmp_path, "micro-bsz: 4\nseq_len: 128\nlr: 1e-4\nlora_alpha: 8\nlora_targets: qkv, o\n"
                           "log_to: [tensorboard]\nfield_map: question=prompt\npack: false\nchat_template: null\n"
                           "nproc: 2\n")
    settings = read_config_file(path)
    assert settings == dict(micro_bsz=4, seq_len=128, lr=1e-4, lora_alpha=8.0, lora_targets=("qkv", "o"),
                            log_to=("tensorboard",), field_map="question=prompt", pack=False, chat_template=None,
                            nproc=2)
    assert isinstance(settings["lora_alpha"], float)
    config, nproc = load_config(path)
    assert nproc == 2
    assert config == TrainConfig(micro_bsz=4, seq_len=128, lr=1e-4, lora_alpha=8.0, lora_targets=("qkv", "o"),
                                 log_to=("tensorboard",), field_map={"question": "prompt"}, pack=False)


def test_overrides_win_over_the_file_and_the_file_over_the_defaults(tmp_path):
    path = write(tmp_path, "steps: 30\nmicro_bsz: 4\n")
    config, nproc = load_config(path, overrides={"steps": 7})
    assert (config.steps, config.micro_bsz, config.accum) == (7, 4, TrainConfig().accum)
    assert nproc is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("stpes: 3\n", "run.yaml: unknown key 'stpes'; did you mean 'steps'?"),
        ("micro-bzs: 3\n", "run.yaml: unknown key 'micro-bzs'; did you mean 'micro_bsz'?"),
        ("xyzzy: 3\n", "run.yaml: unknown key 'xyzzy'; the keys are the options of `sftplug train -h`"),
        ("steps: ten\n", "run.yaml, key 'steps': expected an integer, got \"ten\""),
        ("steps: 3.5\n", "run.yaml, key 'steps': expected an integer, got 3.5"),
        ("steps: true\n", "run.yaml, key 'steps': expected an integer, got true"),
        ("lr: [1, 2]\n", "run.yaml, key 'lr': expected a number, got [1, 2]"),
        ("lr: fast\n", "run.yaml, key 'lr': expected a number, got \"fast\""),
        ("lr: true\n", "run.yaml, key 'lr': expected a number, got true"),
        ("pack: 1\n", "run.yaml, key 'pack': expected true or false, got 1"),
        ("model: 7\n", "run.yaml, key 'model': expected a string, got 7"),
        ("model: null\n", "run.yaml, key 'model': expected a string, got null"),
        ("chat_template: 3\n", "run.yaml, key 'chat_template': expected a string or null, got 3"),
        ("lora_targets: [1, 2]\n", "run.yaml, key 'lora_targets': expected a list of names or a comma-separated"),
        ("field_map: [a, b]\n", "run.yaml, key 'field_map': expected a mapping or FIELD=NAME pairs"),
        ("nproc: 0\n", "run.yaml, key 'nproc': must be at least 1, got 0"),
        ("steps: 3\nsteps-: 4\n", "run.yaml: unknown key 'steps-'"),
        ("micro_bsz: 3\nmicro-bsz: 4\n", "run.yaml: key 'micro_bsz' is given twice"),
        # TrainConfig's own checks, with the file and key in front
        ("steps: 0\n", "run.yaml, key 'steps': --steps must be at least 1, got 0"),
        ("dtype: fp8\n", "run.yaml, key 'dtype': --dtype must be one of auto, bf16, fp16, fp32, got 'fp8'"),
        ("lr: -1e-4\n", "run.yaml, key 'lr': --lr must be positive, got -0.0001"),
        ("field_map: question\n", "run.yaml, key 'field_map': --field-map question: expected FIELD=NAME pairs"),
        ("quantize: nf4\nfull: true\n", "run.yaml, keys 'quantize', 'full': --quantize nf4 keeps the frozen base"),
        ("eval_split: 0.1\neval_data: e.jsonl\n", "run.yaml, keys 'eval_split', 'eval_data': use --eval-split or"),
        # the file itself
        ("steps: 3\n  lr: 1\n", "run.yaml: not valid YAML: line 2, column 5: mapping values are not allowed here"),
        ("[steps, 3]\n", "run.yaml: expected a mapping of option names to values at the top, got a list"),
        ("just text\n", "run.yaml: expected a mapping of option names to values at the top, got a str"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_key(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, text)
    with pytest.raises(SftplugError) as error:
        load_config("run.yaml")
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_a_bad_value_the_command_line_gave_is_not_blamed_on_the_file(tmp_path):
    path = write(tmp_path, "steps: 3\n")
    with pytest.raises(SftplugError, match="^--micro-bsz must be at least 1, got 0$"):
        load_config(path, overrides={"micro_bsz": 0})


def test_missing_file_folder_and_empty_file(tmp_path):
    with pytest.raises(SftplugError, match=f"^{tmp_path / 'nope.yaml'}: config file not found$"):
        read_config_file(tmp_path / "nope.yaml")
    with pytest.raises(SftplugError, match="is a folder; --config takes a YAML or TOML file$"):
        read_config_file(tmp_path)
    assert load_config(write(tmp_path, "# nothing set yet\n")) == (TrainConfig(), None)


def test_toml_files(tmp_path):
    path = write(tmp_path, 'steps = 5\nlr = 1e-4\nlora_targets = ["qkv"]\nmicro-bsz = 2\n', "run.toml")
    assert load_config(path)[0] == TrainConfig(steps=5, lr=1e-4, lora_targets=("qkv",), micro_bsz=2)
    bad = write(tmp_path, "steps = \n", "bad.toml")
    with pytest.raises(SftplugError, match=r"^.*bad.toml: not valid TOML: .*line 1"):
        read_config_file(bad)


def test_toml_before_python_3_11_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` fails as on Python 3.10
    with pytest.raises(SftplugError, match="run.toml: TOML config files need Python 3.11 or newer; use a YAML file"):
        read_config_file(write(tmp_path, "steps = 5\n", "run.toml"))


def test_the_dump_lists_every_key_in_order_and_loads_back_equal(tmp_path):
    config = TrainConfig(model="some/folder", data="mine.jsonl", eval_split=0.05, lr=2e-5, lora_targets=("qkv",),
                         field_map={"q": "prompt", "a": "completion"}, log_to=("tensorboard", "wandb"),
                         chat_template="chatml", full=True, strategy="fsdp", sample_prompt="Hi: there #1")
    text = dump_config(config, nproc=4)
    assert list(yaml.safe_load(text)) == KEYS == [f.name for f in fields(TrainConfig)] + ["nproc"]
    assert load_config(write(tmp_path, text)) == (config, 4)
    assert load_config(write(tmp_path, dump_config(TrainConfig()))) == (TrainConfig(), None)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_a_valid_config(example):
    config, nproc = load_config(example)
    assert isinstance(config, TrainConfig)
    assert nproc is None or nproc >= 1


def test_the_examples_are_the_documented_ones():
    assert {p.name for p in EXAMPLES} >= {"demo.yaml", "lora-hf-llama.yaml", "full-fsdp.yaml"}
    assert load_config(EXAMPLES[[p.name for p in EXAMPLES].index("demo.yaml")]) == (TrainConfig(), None)
    fsdp, nproc = load_config(EXAMPLES[[p.name for p in EXAMPLES].index("full-fsdp.yaml")])
    assert fsdp.full and fsdp.strategy == "fsdp" and nproc > 1
