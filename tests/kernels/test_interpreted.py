"""Every module marked ``interpreted`` in tests/kernels, in one child pytest started with
TRITON_INTERPRET=1 (see conftest.py for why it cannot run in this process)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.slow  # every test here starts a process

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this is the interpreter's process")
def test_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)  # the child runs its own workers
    command = [sys.executable, "-m", "pytest", str(HERE), "-m", "interpreted", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(command, cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout, done.stdout[-2000:]
