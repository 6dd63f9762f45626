"""`sftplug doctor`: versions, which attention backends run each dtype here, auto's picks, overrides."""

import importlib.util
import json

import torch
from click.testing import CliRunner

from sftplug import probes
from sftplug.cli import cli
from sftplug.diagnostics.doctor import doctor_report, format_doctor

CPU_ONLY = not torch.cuda.is_available()


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def test_doctor_reports_versions_backends_and_overrides(monkeypatch, registry):
    monkeypatch.setenv("PYTORCH_SDP_KERNEL", "math")
    report = doctor_report(registry)
    json.dumps(report)  # --json must work
    assert report["torch"] == torch.__version__ and report["triton"] == probes.triton_version()
    assert report["environment"] == {"PYTORCH_SDP_KERNEL": "math"}
    rows = {a["name"]: a for a in report["attention"]}
    assert {"flash", "efficient", "cudnn", "math", "triton"} <= set(rows)
    assert all(set(a["dtypes"]) == {"bf16", "fp16", "fp32"} for a in rows.values())
    text = format_doctor(report)
    assert "PYTORCH_SDP_KERNEL=math" in text and "attention on " in text
    if CPU_ONLY:
        assert report["gpu"] is None and "CPU-only" in report["no_gpu_reason"]
        assert rows["flash"]["dtypes"] == {"bf16": None, "fp16": None, "fp32": None}
        assert rows["flash"]["gqa"] == "native" and rows["math"]["gqa"] == "repeat"
        assert not rows["efficient"]["available"] and "runs only on CUDA GPUs" in rows["efficient"]["reason"]
        assert report["auto"]["bf16"]["backend"] == "flash" and report["auto"]["fp32 packed"]["backend"] == "flash"
        assert "efficient  unavailable: efficient attention runs only on CUDA GPUs" in text


def test_doctor_command(monkeypatch):
    monkeypatch.setenv("SDPA_BACKEND", "math")
    text = invoke("doctor")
    assert text.exit_code == 0, text.output
    assert "torch " in text.output and "SDPA_BACKEND=math" in text.output
    as_json = invoke("doctor", "--json", "--head-dim", "128")
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout)["shape"]["head_dim"] == 128
    bad = invoke("doctor", "--heads", "6", "--kv-heads", "4")
    assert bad.exit_code == 2 and "multiple of --kv-heads" in bad.output


def test_doctor_says_whether_bitsandbytes_is_there_and_how_to_get_it(registry, monkeypatch):
    report = doctor_report(registry)
    installed = importlib.util.find_spec("bitsandbytes") is not None
    assert (report["bitsandbytes"] is not None) == installed
    if installed:
        assert f"bitsandbytes {report['bitsandbytes']}: for --quantize nf4|fp4" in format_doctor(report)
    missing = format_doctor({**report, "bitsandbytes": None})
    assert "bitsandbytes: not installed; --quantize and the 8-bit / paged optimizers need it (pip install" in missing
