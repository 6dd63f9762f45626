"""sftplug starts from any working directory with today's transformers and peft.

Two places hide installed packages when the working directory is on sys.path (`python -m`,
torchrun's workers, a REPL): the repo root, whose kernels/ folder has the name of PyPI's
`kernels` (which transformers imports), and a folder holding a clone named `sftplug`, which
Python could take for the package. Every way of starting sftplug runs from both.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = [
    pytest.mark.slow,  # every test here starts a process
    pytest.mark.skipif(not (BIN / "torchrun").exists(), reason="needs the venv's torchrun script"),
]


@pytest.fixture(scope="module", params=["repo root", "beside a clone"])
def cwd(request, tmp_path_factory):
    if request.param == "repo root":
        return ROOT
    holder = tmp_path_factory.mktemp("holder")
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache")
    shutil.copytree(ROOT, holder / "sftplug", symlinks=True, ignore=ignore)
    return holder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    rows = [{"prompt": f"Count to {n}.", "completion": " ".join(map(str, range(1, n + 1)))} for n in range(2, 40)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run(cmd, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def train(out, data):
    return ["train", "--data", str(data), "--out", str(out), "--steps", "2", "--seq-len", "64", "--micro-bsz", "2"]


def test_imports_find_the_installed_packages(cwd):
    code = "import kernels, peft, sftplug, transformers; print(kernels.get_kernel.__module__); print(sftplug.__file__)"
    kernels_module, sftplug_file = run([sys.executable, "-c", code], cwd).stdout.split()
    assert kernels_module.startswith("kernels.")  # PyPI's kernels, not the repo's kernels/ folder
    assert Path(sftplug_file) == ROOT / "sftplug" / "__init__.py"  # the installed (editable) sftplug


def test_python_dash_m(cwd, data, tmp_path):
    run([sys.executable, "-m", "sftplug", *train(tmp_path / "run", data)], cwd)
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_nproc(cwd, data, tmp_path):
    run([str(BIN / "sftplug"), *train(tmp_path / "run", data), "--nproc", "2"], cwd)
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_torchrun(cwd, data, tmp_path):
    launcher = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "sftplug"]
    run([*launcher, *train(tmp_path / "run", data)], cwd)
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_bench_step(cwd):
    bench = [str(BIN / "sftplug"), "bench", "step", "--workload", "W0", "--rounds", "1", "--steps", "1", "--warmup",
             "0", "--json"]  # only that both sides start here
    result = json.loads(run(bench, cwd).stdout)
    assert result["errors"] == {} and list(result["sides"]) == ["sftplug", "hf+peft"]  # both sides ran
