"""A third-party plugin, installed for real, is listed and selectable by name.

tests/fixtures/sftplug_hello_plugin is a separate package declaring entry points in the
group "sftplug": ``hello`` (an attention backend), ``hello-ops`` (a fused RMSNorm),
``hello-parallel`` (a load_state plugin bringing an architecture sftplug does not ship),
``hello-broken`` (fails to import), ``hello-unavailable`` (its availability check says no)
and ``hello-check-raises`` (its check crashes). pip installs it into a temporary folder (``--target``), so the shared
environment is never changed and nothing needs uninstalling; the CLI runs as a
subprocess with that folder on PYTHONPATH, which is how importlib.metadata finds the
entry points of any installed distribution.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from sftplug.attention import AttentionRequest
from sftplug.attention.choice import attention_skipped, choose_backend
from sftplug.config import ASSETS, TrainConfig
from sftplug.diagnostics.doctor import doctor_report
from sftplug.errors import SftplugError
from sftplug.registry import build_registry

pytestmark = pytest.mark.slow  # every test here needs the plugin that pip installs in a child process

FIXTURE = Path(__file__).parent / "fixtures" / "sftplug_hello_plugin"


def build_wheel_by_hand(pkg: Path, out: Path) -> Path:
    """A minimal wheel of the fixture, for environments without setuptools (pip installs it)."""
    import tomllib

    project = tomllib.loads((pkg / "pyproject.toml").read_text())["project"]
    name, version = project["name"].replace("-", "_"), project["version"]
    info = f"{name}-{version}.dist-info"
    entry_points = "".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
        for group, eps in project["entry-points"].items()
    )
    wheel = out / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path in sorted((pkg / "sftplug_hello").glob("*.py")):
            zf.write(path, f"sftplug_hello/{path.name}")
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {version}\n")
        wheel_info = "Wheel-Version: 1.0\nGenerator: sftplug-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        zf.writestr(f"{info}/WHEEL", wheel_info)
        zf.writestr(f"{info}/entry_points.txt", entry_points)
        zf.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The fixture package, pip-installed (offline) into a folder of its own."""
    root = tmp_path_factory.mktemp("third_party")
    pkg = root / "sftplug_hello_plugin"
    shutil.copytree(FIXTURE, pkg, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    if importlib.util.find_spec("setuptools") is not None:
        source = pkg  # the real thing: pip builds the pyproject.toml package
    elif sys.version_info >= (3, 11):
        source = build_wheel_by_hand(pkg, root)
    else:  # pragma: no cover
        pytest.skip("needs setuptools (or Python 3.11+ to build the wheel by hand)")
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "--quiet", "--target", str(target), str(source)]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (target / "sftplug_hello-0.1.0.dist-info" / "entry_points.txt").is_file()
    return target


def sftplug_cli(site: Path, *args: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("SFTPLUG_NO_ENTRYPOINTS", "SFTPLUG_DISABLE_PLUGINS")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), environ.get("PYTHONPATH")]))
    environ.update(env)
    return subprocess.run([sys.executable, "-m", "sftplug", *args], capture_output=True, text=True, cwd=cwd,
                          env=environ, timeout=600)


def test_sftplug_plugins_lists_the_installed_plugin_and_the_broken_ones(site, tmp_path):
    done = sftplug_cli(site, "plugins", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    plugins = {p["name"]: p for p in json.loads(done.stdout)}
    hello = plugins["hello"]
    assert hello["available"] and hello["source"] == "sftplug-hello 0.1.0" and hello["hooks"] == ["select_attention"]
    assert plugins["hello-broken"]["reason"] == (
        "failed to load: ImportError: sftplug_hello.broken needs the package 'not-installed-anywhere'"
    )
    assert plugins["hello-unavailable"]["reason"] == (
        "hello-unavailable needs a quantum accelerator, and this machine has none"
    )
    assert plugins["hello-check-raises"]["reason"] == "availability check raised RuntimeError: the probe crashed"
    assert not any(plugins[n]["available"] for n in ("hello-broken", "hello-unavailable", "hello-check-raises"))
    assert plugins["flash"]["available"] and plugins["math"]["available"]  # one broken plugin breaks nothing
    text = sftplug_cli(site, "plugins", cwd=tmp_path)
    assert text.returncode == 0 and "reason: failed to load: ImportError" in text.stdout


def test_sftplug_train_runs_with_the_third_party_backend(site, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join((ASSETS / "default_train.jsonl").read_text().splitlines()[:40]) + "\n")
    held_out = tmp_path / "eval.jsonl"  # plain text: no sample prompt, so no generation
    held_out.write_text(json.dumps({"text": "Count from 4 to 9: 4, 5, 6, 7, 8, 9."}) + "\n")
    calls = tmp_path / "calls.txt"
    done = sftplug_cli(
        site, "train", "--attention", "hello", "--steps", "2", "--seq-len", "64", "--micro-bsz", "2", "--full",
        "--data", str(data), "--eval-data", str(held_out), "--out", str(tmp_path / "run"),
        cwd=tmp_path, SFTPLUG_HELLO_CALLS=str(calls), PYTORCH_SDP_KERNEL="math",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "attention: hello (requested" in done.stdout
    assert "PYTORCH_SDP_KERNEL=math found and ignored" in done.stdout
    n_layers = 2  # the built-in tiny preset
    assert int(calls.read_text()) >= 2 * n_layers  # two updates' forwards went through hello
    assert (tmp_path / "run" / "checkpoints" / "step-2").is_dir()


@pytest.fixture
def installed(site, monkeypatch):
    """The same installation, visible to this process for the duration of one test."""
    monkeypatch.syspath_prepend(str(site))
    return build_registry()


def test_the_third_party_backend_is_offered_but_does_not_win_auto(installed):
    request = AttentionRequest("auto", torch.device("cpu"), torch.float32, 64, 4, 2, packed=True)
    choice = choose_backend(installed.hook, request, attention_skipped(installed))
    assert choice.backend.name != "hello" and "hello" in choice.why_chosen  # listed among the usable, last
    named = choose_backend(installed.hook, AttentionRequest("hello", request.device, request.dtype, 64, 4, 2, True))
    assert named.backend.name == "hello" and named.why_chosen.startswith("hello (requested")


def test_an_unavailable_third_party_backend_says_why(installed):
    request = AttentionRequest("hello-unavailable", torch.device("cpu"), torch.float32, 64, 4, 2)
    with pytest.raises(SftplugError, match="'hello-unavailable' is unavailable: hello-unavailable needs a quantum"):
        choose_backend(installed.hook, request, attention_skipped(installed))


def test_doctor_shows_third_party_backends(installed):
    rows = {a["name"]: a for a in doctor_report(installed, device="cpu")["attention"]}
    assert rows["hello"]["source"] == "sftplug-hello 0.1.0"
    assert rows["hello"]["dtypes"] == {"bf16": None, "fp16": None, "fp32": None}
    assert not rows["hello-unavailable"]["available"] and not rows["hello-broken"]["available"]


def test_a_third_party_fused_form_wins_auto_and_computes_the_model(installed):
    from sftplug.fused.choice import attach_fused
    from sftplug.model.transformer import ModelConfig, Transformer
    from sftplug.train.setup import fused_request

    model = Transformer(ModelConfig.preset("tiny"))
    model.init_weights(0)
    model.set_attention(plain_attention)
    ids = torch.randint(0, 1024, (1, 12))
    before = model(ids)
    request = fused_request(model, TrainConfig(micro_bsz=1, seq_len=12), torch.device("cpu"), torch.float32)
    choice = attach_fused(model, installed, request, "auto")
    assert choice.forms["rmsnorm"] == "hello" and "always claims" in choice.why_chosen["rmsnorm"]
    assert choice.forms["glu"] == "pytorch"
    norm = choice.ops.rmsnorm
    calls = norm.calls
    after = model(ids)
    assert norm.calls - calls == 2 * len(model.layers) + 1  # every norm of the model went through it
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # float64 vs fp32 norms: fp32 rounding
    pinned = attach_fused(model, installed, request, "rmsnorm=hello")
    assert pinned.forms == {"rmsnorm": "hello", "glu": "pytorch", "rope": "pytorch", "cross_entropy": "pytorch",
                            "grouped_linear": "pytorch"}


def test_a_third_party_architecture_trains_resumes_and_generates_through_the_model_contract(installed, tmp_path):
    from sftplug.checkpoint.export import export_checkpoint
    from sftplug.loading import load_model
    from sftplug.model.generate import answer
    from sftplug.train.loop import train

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join((ASSETS / "default_train.jsonl").read_text().splitlines()[:40]) + "\n")
    out = tmp_path / "run"
    common = dict(model="hello-parallel", seq_len=64, micro_bsz=2, data=str(data), out=str(out), eval_data=None,
                  log_every=1, warmup=0, sample_prompt=None)
    lines = []
    train(TrainConfig(steps=2, **common), installed, echo=lines.append)
    assert any(line.startswith("model: hello-parallel: GPT-J-style parallel blocks; LoRA r=16") for line in lines)
    train(TrainConfig(steps=3, resume="auto", **common), installed, echo=lines.append)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    loaded = load_model(str(out), registry=installed)  # the checkpoint's base comes back through the plugin
    assert type(loaded.model.layers[0]).__name__ == "ParallelBlock"
    assert isinstance(answer(loaded.model, loaded.tokenizer, "Count from 1 to 3.", max_new_tokens=4), str)
    with pytest.raises(SftplugError, match="cannot export a 'hello-parallel' model as an HF folder: transformers "
                                           "has no such model type"):
        export_checkpoint(out, tmp_path / "hf", registry=installed)


def test_the_third_party_architecture_is_what_it_says(installed):
    from sftplug.loading import load_model

    model = load_model("hello-parallel", registry=installed).model
    block = model.layers[0]
    assert type(block).__name__ == "ParallelBlock" and block.mlp_norm is None
    x = torch.randn(1, 5, model.config.hidden_size)
    cos, sin = model.rope(torch.arange(5)[None], torch.float32)
    with torch.no_grad():
        h = block.attn_norm(x)
        expected = x + block.attn(h, cos, sin) + block.mlp(h)  # both branches read the same normed input
        torch.testing.assert_close(block(x, cos, sin), expected, rtol=0, atol=0)


def plain_attention(q, k, v, causal=True, doc_ids=None):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
