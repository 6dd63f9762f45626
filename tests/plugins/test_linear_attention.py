"""The built-in linear-attention backends: the Triton kernel trains a hybrid model as the PyTorch
form does (on the CPU through the Triton interpreter), and is chosen only after its first run."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sftplug.config import DEFAULT_DATA

transformers = pytest.importorskip("transformers")


def run(out, folder, backend, **env):
    data = out.parent / "data.jsonl"  # a few records: the interpreter is slow; packed rows exercise doc_ids
    data.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:8]))
    done = subprocess.run([sys.executable, "-m", "sftplug", "train", "--model", str(folder), "--steps", "2",
                           "--seq-len", "48", "--micro-bsz", "2", "--warmup", "1", "--sample-prompt", "Hi",
                           "--data", str(data), "--out", str(out), "--linear-attention", backend],
                          capture_output=True, text=True, env={**os.environ, "SFTPLUG_NO_ENTRYPOINTS": "1", **env})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel runs compiled (tests/kernels)")
def test_triton_trains_a_hybrid_model_as_the_pytorch_form_under_the_interpreter(tmp_path, make_hf_folder):
    folder = tmp_path / "qwen3_5"
    make_hf_folder(folder, config_class="Qwen3_5TextConfig", num_hidden_layers=4, head_dim=16,
                   linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)
    header, triton = run(tmp_path / "triton", folder, "triton", TRITON_INTERPRET="1")
    assert "linear attention: triton (requested; runs fp32, 2/4 heads of 16/16, packed rows on cpu)" in header
    _, pytorch = run(tmp_path / "pytorch", folder, "pytorch")
    assert triton == pytest.approx(pytorch, rel=1e-5)
