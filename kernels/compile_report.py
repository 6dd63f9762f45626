"""sftplug's Triton kernels compiled for real GPU targets, on a machine without a GPU.

``triton.compile`` with a ``GPUTarget`` builds the PTX and the cubin anywhere (the Triton
wheel ships ptxas). For each launch configuration this reports what the GPU would pay:
shared memory (Triton's metadata), registers and spilled bytes (``ptxas -v``), and, on
Hopper, whether the matrix products use ``wgmma`` (the PTX). ``sftplug doctor --compile``
prints the table; the tests require every configuration the autotuner may choose to spill
nothing, use wgmma on sm_90a and fit the target's shared memory.

The attention kernels are compiled as a training run launches them: contiguous [B, H, T, D]
tensors (pointers and strides divisible by 16), 32 query heads over 8 K/V heads, causal,
packed documents on (the variant with every code path; a sliding window takes the same
one, its ranges come from the host; the forward with attention sinks on, which only add a few
operations after its key loop), with and without soft-capped scores (the "softcap"
variant: a constexpr switch, compiled apart, with one more tile live). The fused ops' kernels (RMSNorm,
the gated MLP, RoPE, the loss) are compiled as their modules' ``compile_specs`` say a W1
run launches them; they have no matrix products, so wgmma is not asked of them. The
experts' grouped GEMM (kernels/grouped_gemm.py) is the exception: its specs name their
target (each has its own tile config) and ask for wgmma on sm_90a. The gated delta rule's
kernels (kernels/gated_delta_rule.py: Gated DeltaNet's linear attention) name their targets too,
at Dk = Dv = 64 and 128, packed documents on.

Public API: :data:`TARGETS`, :func:`compile_config`, :func:`compile_spec`, :func:`report`.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from sftplug.kernels import attention, cross_entropy, gated_delta_rule, glu, grouped_gemm, rms_norm, rope

# modules with compile_specs(dtype); a spec naming its "targets" is compiled for those only
FUSED_KERNELS = (rms_norm, glu, rope, cross_entropy, grouped_gemm, gated_delta_rule)

# name -> (compute capability, warp size, shared memory a block may use in bytes: A100's
# 163 KB, Hopper's 227 KB)
TARGETS = {"sm_80": (80, 32, 163 * 1024), "sm_90a": (90, 64, 227 * 1024)}
KINDS = ("fwd", "dkdv", "dq")
# Kernels that use mma.sync on Hopper by design (no wgmma tile fits without spills), which
# is why auto never takes Triton for these head dims on Hopper.
WITHOUT_WGMMA = {("dkdv", 256)}
_HQ, _HKV = 32, 8
_POINTER_DTYPES = {"LSE": "fp32", "DELTA": "fp32", "RANGES": "i32", "SINKS": "fp32"}


@dataclass
class Compiled:
    kernel: str
    target: str
    dtype: str
    head_dim: int
    block_m: int
    block_n: int
    warps: int
    stages: int
    shared: int | None = None  # bytes of dynamic shared memory
    registers: int | None = None  # per thread
    spills: int | None = None  # bytes spilled (stores + loads)
    wgmma: bool | None = None  # Hopper's warpgroup matrix products (sm_90a only)
    fits: bool | None = None  # shared memory within the target's limit
    error: str | None = None
    detail: str = ""  # a fused kernel's constexprs, in place of the attention block sizes
    variant: str = ""  # an attention kernel's compiled variant beyond the default: "softcap"

    @property
    def ok(self) -> bool:
        """No spills, within shared memory, and wgmma where auto may choose the kernel on Hopper."""
        wgmma_ok = self.wgmma is not False or (self.kernel, self.head_dim) in WITHOUT_WGMMA
        return self.error is None and bool(self.fits) and self.spills == 0 and wgmma_ok

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in ("qk_scale", "sm_scale", "softcap"):
            types[name] = "fp32"
        elif _is_tensor(name):
            types[name] = "*" + _POINTER_DTYPES.get(name, dtype)
        else:  # strides, T and the tuning key
            types[name] = "i32"
    return types


def _is_tensor(name: str) -> bool:
    return name[0].isupper() and name not in ("T", "T_BUCKET")  # tensors are named in capitals


def _constexprs(kind: str, head_dim: int, block_m: int, block_n: int, softcap: bool = False) -> dict:
    values = dict(HQ=_HQ, GROUP=_HQ // _HKV, HEAD_DIM=head_dim, CAUSAL=True, HAS_DOCS=True, SOFTCAP=softcap,
                  BLOCK_M=block_m, BLOCK_N=block_n)
    if kind == "dkdv":
        values.update(HKV=_HKV, SPLIT=1)
    if kind == "fwd":  # with sinks: every code path (they only touch the end of the forward)
        values.update(HAS_SINKS=True)
    return values


def _ptxas_usage(ptx: str, capability: int) -> tuple[int, int]:
    """(registers, spilled bytes) as ptxas -v reports them for the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", path, "-o", path + ".o"],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1])
    registers = int(re.search(r"Used (\d+) registers", done.stderr).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", done.stderr))
    return registers, spills


def _compile(row: Compiled, fn, signature: dict, constexprs: dict, divisible, warps: int, stages: int,
             wgmma: bool) -> Compiled:
    """Compile ``fn`` for ``row.target`` and fill in what the GPU would pay (or the error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    capability, warp_size, shared_limit = TARGETS[row.target]
    try:
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, warp_size),
                                  options={"num_warps": warps, "num_stages": stages, "enable_fp_fusion": True})
        row.shared = int(compiled.metadata.shared)
        row.fits = row.shared <= shared_limit
        row.registers, row.spills = _ptxas_usage(compiled.asm["ptx"], capability)
        if wgmma and capability >= 90:
            row.wgmma = "wgmma.mma_async" in compiled.asm["ptx"]
    except Exception as exc:  # a config that does not compile is a finding, not a crash
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return row


def compile_config(kind: str, target: str, dtype: str, head_dim: int, config: tuple,
                   softcap: bool = False) -> Compiled:
    """Compile one attention kernel in one (BLOCK_M, BLOCK_N, warps, stages) configuration for ``target``
    (``softcap``: the soft-capped variant)."""
    block_m, block_n, warps, stages = config
    row = Compiled(kind, target, dtype, head_dim, block_m, block_n, warps, stages,
                   variant="softcap" if softcap else "")
    kernel = attention.kernel_of(kind)
    constexprs = _constexprs(kind, head_dim, block_m, block_n, softcap)
    divisible = [n for n in kernel.arg_names if n not in constexprs and (_is_tensor(n) or n.startswith("stride_"))]
    return _compile(row, kernel, _signature(kernel, dtype, constexprs), constexprs, divisible, warps, stages,
                    wgmma=True)


def compile_spec(spec: dict, target: str, dtype: str) -> Compiled:
    """Compile one fused-op kernel as its module's ``compile_specs(dtype)`` describes it (wgmma
    is asked of the specs that say ``wgmma``: those with matrix products)."""
    detail = spec.get("detail") or " ".join(f"{k}={v}" for k, v in spec["constexprs"].items())
    row = Compiled(spec["name"], target, dtype, 0, 0, 0, spec["num_warps"], spec["num_stages"], detail=detail)
    return _compile(row, spec["fn"], spec["signature"], spec["constexprs"], spec["divisible"], spec["num_warps"],
                    spec["num_stages"], wgmma=spec.get("wgmma", False))


def report(targets=tuple(TARGETS), dtypes=("bf16", "fp16"), head_dims=None, workers: int | None = None,
           attention_kernels: bool = True, fused: bool = True, softcap=(False, True)) -> list[Compiled]:
    """Every configuration the attention autotuner may choose on each target, and every fused-op
    kernel as W1 launches it, compiled and measured.

    ``head_dims``: default every one the kernels accept (``attention.HEAD_DIMS``), each with its own configs.
    ``softcap``: the attention variants to compile, without and with soft-capping.
    """
    head_dims = head_dims or attention.HEAD_DIMS
    jobs = []
    for target in targets:
        hopper = TARGETS[target][0] >= 90  # as attention._candidates decides on a real GPU
        for kind in KINDS if attention_kernels else ():
            for head_dim in head_dims:
                for capped in softcap:
                    jobs += [(compile_config, kind, target, dtype, head_dim, config, capped) for dtype in dtypes
                             for config in attention.candidate_configs(kind, head_dim, hopper, capped)]
        for module in FUSED_KERNELS if fused else ():
            jobs += [(compile_spec, spec, target, dtype) for dtype in dtypes for spec in module.compile_specs(dtype)
                     if target in spec.get("targets", (target,))]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:  # ptxas runs outside the GIL
        return list(pool.map(lambda job: job[0](*job[1:]), jobs))


def format_report(rows: list[Compiled]) -> str:
    """The report as a table, findings first."""
    def config_of(r):
        size = r.detail or f"{r.block_m}x{r.block_n}"
        variant = f" {r.variant}" if r.variant else ""
        return f"{size}{variant} w{r.warps} s{r.stages}"

    width, cwidth = max([5] + [len(r.kernel) for r in rows]), max([16] + [len(config_of(r)) for r in rows])
    header = f"{'kernel':<{width}} {'target':<7} {'dtype':<5} {'D':>4} {'config':<{cwidth}} {'smem KB':>8} " \
             f"{'regs':>5} {'spill B':>8} {'wgmma':<6} verdict"
    lines = [header]
    for r in sorted(rows, key=lambda r: (r.ok, r.kernel, r.target, r.head_dim, r.dtype)):
        config = config_of(r)
        head_dim = r.head_dim or "-"
        if r.error:
            lines.append(f"{r.kernel:<{width}} {r.target:<7} {r.dtype:<5} {head_dim:>4} {config:<{cwidth}} "
                         f"failed: {r.error}")
            continue
        wgmma = "-" if r.wgmma is None else ("yes" if r.wgmma else "no")
        verdict = "ok" if r.ok else ", ".join(
            why for why, bad in (("spills", r.spills), ("no wgmma", r.wgmma is False), ("too much smem", not r.fits))
            if bad)
        lines.append(f"{r.kernel:<{width}} {r.target:<7} {r.dtype:<5} {head_dim:>4} {config:<{cwidth}} "
                     f"{r.shared / 1024:>8.0f} {r.registers:>5} {r.spills:>8} {wgmma:<6} {verdict}")
    bad = sum(not r.ok for r in rows)
    lines.append(f"{len(rows)} configurations, {bad} with findings")
    return "\n".join(lines)
