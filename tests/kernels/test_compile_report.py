"""Every Triton attention config the autotuner may choose, compiled for sm_80 and sm_90a on
this CPU machine (triton.compile with a GPUTarget; the Triton wheel ships ptxas): no register
spills, shared memory within the target's, and wgmma on Hopper wherever auto may pick Triton.

The kernels are compiled in bf16 at head dims 64, 128 and 256, which own the config tables
(16 and 32 take 64's and use fewer registers); fp16 compiles to the same registers and
shared memory (checked on one config). `sftplug doctor --compile` covers every dtype and
head dim.
"""

import os

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1: kernels are interpreted, not compiled", allow_module_level=True)

from sftplug.kernels import attention  # noqa: E402
from sftplug.kernels.compile_report import TARGETS, WITHOUT_WGMMA, compile_config, format_report, report  # noqa: E402


def test_every_config_the_autotuner_may_choose_compiles_clean():
    rows = report(dtypes=("bf16",), head_dims=(64, 128, 256))
    expected = sum(len(attention.candidate_configs(kind, d, TARGETS[t][0] >= 90))
                   for t in TARGETS for kind in ("fwd", "dkdv", "dq") for d in (64, 128, 256))
    assert len(rows) == expected
    assert all(r.ok for r in rows), format_report(rows)
    hopper = [r for r in rows if r.target == "sm_90a"]
    assert all(r.wgmma for r in hopper if (r.kernel, r.head_dim) not in WITHOUT_WGMMA), format_report(rows)


def test_the_report_sees_spills_and_missing_wgmma():
    spilling = compile_config("fwd", "sm_90a", "bf16", 256, (64, 64, 8, 2))  # two fp32 [64, 256] tiles per warp
    assert spilling.error is None and spilling.spills > 0 and not spilling.ok
    narrow = compile_config("dq", "sm_90a", "bf16", 128, (32, 32, 4, 2))  # M=32: below wgmma's 64 rows
    assert narrow.error is None and narrow.wgmma is False and not narrow.ok


def test_fp16_compiles_like_bf16():
    bf16, fp16 = (compile_config("dkdv", "sm_90a", dtype, 128, (32, 128, 8, 3)) for dtype in ("bf16", "fp16"))
    assert (fp16.registers, fp16.shared, fp16.spills, fp16.wgmma) == (bf16.registers, bf16.shared, bf16.spills,
                                                                       bf16.wgmma)
