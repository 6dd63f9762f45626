"""Every Triton attention config the autotuner may choose, and every fused-op kernel as a W1
run launches it, compiled for sm_80 and sm_90a on this CPU machine (triton.compile with a
GPUTarget; the Triton wheel ships ptxas): no register spills, shared memory within the
target's, and wgmma on Hopper wherever auto may pick Triton attention.

The attention kernels are compiled in bf16 at every head dim `sftplug doctor --compile`
reports (the report's own default, each head dim with configs of its own), without and with
soft-capping (a constexpr variant with one more tile live; a sliding window compiles as
packed documents do); fp16 compiles to the same registers and shared memory (checked on the
configs that spilled in both dtypes before small head dims had configs of their own).
`sftplug doctor --compile` covers both dtypes.
"""

import os

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1: kernels are interpreted, not compiled", allow_module_level=True)

from sftplug.kernels import attention  # noqa: E402
from sftplug.kernels.compile_report import (  # noqa: E402
    FUSED_KERNELS,
    TARGETS,
    WITHOUT_WGMMA,
    compile_config,
    format_report,
    report,
)


@pytest.mark.parametrize("softcap", [False, True], ids=["plain", "softcap"])
def test_every_config_the_autotuner_may_choose_compiles_clean(softcap):
    rows = report(dtypes=("bf16",), fused=False, softcap=(softcap,))  # the head dims doctor --compile reports
    assert {r.head_dim for r in rows} == set(attention.HEAD_DIMS)
    expected = sum(len(attention.candidate_configs(kind, d, TARGETS[t][0] >= 90, softcap))
                   for t in TARGETS for kind in ("fwd", "dkdv", "dq") for d in attention.HEAD_DIMS)
    assert len(rows) == expected
    assert {r.variant for r in rows} == {"softcap" if softcap else ""}
    assert all(r.ok for r in rows), format_report(rows)
    hopper = [r for r in rows if r.target == "sm_90a"]
    assert all(r.wgmma for r in hopper if (r.kernel, r.head_dim) not in WITHOUT_WGMMA), format_report(rows)


def test_every_fused_op_kernel_compiles_clean_as_w1_launches_it():
    rows = report(dtypes=("bf16", "fp16"), attention_kernels=False)
    expected = [(spec["name"], target, dtype) for target in TARGETS for module in FUSED_KERNELS
                for dtype in ("bf16", "fp16") for spec in module.compile_specs(dtype)
                if target in spec.get("targets", TARGETS)]
    assert sorted((r.kernel, r.target, r.dtype) for r in rows) == sorted(expected)
    assert all(r.ok and r.spills == 0 for r in rows), format_report(rows)
    names = {r.kernel for r in rows}  # forward and backward of every op (the loss step has one kernel)
    for op in ("rms_norm", "glu_silu", "glu_gelu_tanh", "rope"):
        assert {f"{op}_fwd", f"{op}_bwd"} <= {n.rsplit("_r", 1)[0] if n.startswith("rope") else n for n in names}, op
    assert "cross_entropy" in names


def test_the_report_sees_spills_and_missing_wgmma():
    spilling = compile_config("fwd", "sm_90a", "bf16", 256, (64, 64, 8, 2))  # two fp32 [64, 256] tiles per warp
    assert spilling.error is None and spilling.spills > 0 and not spilling.ok
    narrow = compile_config("dq", "sm_90a", "bf16", 128, (32, 32, 4, 2))  # M=32: below wgmma's 64 rows
    assert narrow.error is None and narrow.wgmma is False and not narrow.ok


@pytest.mark.parametrize("kind, target, head_dim, config", [
    ("dkdv", "sm_90a", 128, (32, 128, 8, 3)),
    ("fwd", "sm_80", 16, (128, 128, 8, 3)),  # spilled 8 B in both dtypes when D=16 took 64's configs
    ("fwd", "sm_80", 32, (128, 64, 8, 3)),  # spilled 16 B in both
])
def test_fp16_compiles_like_bf16(kind, target, head_dim, config):
    bf16, fp16 = (compile_config(kind, target, dtype, head_dim, config) for dtype in ("bf16", "fp16"))
    assert (fp16.registers, fp16.shared, fp16.spills, fp16.wgmma) == (bf16.registers, bf16.shared, bf16.spills,
                                                                       bf16.wgmma)
