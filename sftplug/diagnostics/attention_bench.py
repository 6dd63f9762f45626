"""`sftplug bench attention`: forward and backward time and TFLOP/s of every backend.

Shapes on CUDA are the attention micro-benchmark of BENCHMARKS.md (causal (B, H, S, D) =
(8, 32, 2048, 64), (4, 32, 2048, 128), (2, 32, 8192, 128), bf16 and fp16) plus S=4096 D=128,
the W1 training shape with GQA (32 query / 4 K/V heads) and a packed-documents case; on the
CPU small fp32 shapes, so it finishes in seconds. Every backend any plugin offers is timed
(the SDPA kernels, ``triton``, third-party ones) where its check passes; the others get
a row saying why not. Each backend runs alone (no fallback can happen inside a row).

FLOPs: 4 * B * H * S^2 * D forward, halved when causal; backward 2.5x forward. For
packed rows the sum over documents of the same (each document attends to itself only).
GPU times come from CUDA events (median of ``repeats``), CPU times from perf_counter.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sftplug import probes
from sftplug.attention import AttentionRequest
from sftplug.attention.choice import attention_skipped, survey
from sftplug.dtypes import BY_NAME, TRAINING
from sftplug.errors import SftplugError
from sftplug.kernels.packed_documents import document_lengths

# (B, H, S, D) or (B, H, H_kv, S, D)
CUDA_SHAPES = [(8, 32, 2048, 64), (4, 32, 2048, 128), (2, 32, 8192, 128), (2, 32, 4096, 128), (8, 32, 4, 2048, 64)]
CUDA_PACKED = (4, 32, 4, 4096, 128)  # rows of documents of 128..2048 tokens
CPU_SHAPES = [(1, 4, 256, 64), (1, 8, 2, 256, 64)]
CPU_PACKED = (2, 4, 2, 512, 64)
MATH_MAX_SEQ_CUDA = 4096  # the math kernel materializes B*H*S^2 scores: minutes and tens of GiB beyond this
MATH_MAX_SEQ_CPU = 1024
BUDGET_S = 150.0  # stop starting new rows after this; keeps the whole bench under 3 minutes on an H100


def run_attention_bench(registry, shapes=None, dtypes=None, device=None, packed: bool = True,
                        repeats: int | None = None, causal: bool = True, budget_s: float = BUDGET_S,
                        echo=None, packed_shape=None) -> list[dict]:
    """Time every offered backend on every shape and dtype; one dict per (backend, case).

    :param registry: a built :class:`sftplug.registry.Registry`.
    :param shapes: (B, H, S, D) or (B, H, H_kv, S, D) tuples; default CUDA_SHAPES on CUDA,
        small ones on the CPU.
    :param dtypes: names ("bf16", "fp16", "fp32"); default bf16 and fp16 on CUDA, fp32 on the CPU.
    :param device: "cuda", "cpu" or a :class:`torch.device`; default the GPU if any.
    :param packed: also time a packed-documents case.
    :param packed_shape: its (B, H, H_kv, S, D); rows hold documents of S/32 .. S/2 tokens.
    :param repeats: timed iterations per row (median reported); default 10 on CUDA, 3 on the CPU.
    :param causal: causal attention (training) or not.
    :param budget_s: rows not started within this many seconds are reported as skipped.
    :param echo: called with each finished row (progress), or None.
    :returns: rows with ``backend, dtype, case, B, H, H_kv, S, D, causal, packed, fwd_ms, bwd_ms,
        fwd_tflops, bwd_tflops, first_ms, status`` (``status`` is "ok", or "skipped: why" /
        "failed: why" with the timings None).
    """
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if probes.cuda_available() else torch.device("cpu")
    )
    cuda = device.type == "cuda"
    if cuda and not probes.cuda_available():
        raise SftplugError(f"cannot bench on {device}: {probes.why_no_gpu()}")
    # The cases: each shape (the device's defaults unless given) in each dtype, and a packed one.
    shapes = [tuple(s) for s in (shapes or (CUDA_SHAPES if cuda else CPU_SHAPES))]
    dtypes = list(dtypes or (("bf16", "fp16") if cuda else ("fp32",)))
    for name in dtypes:
        if name not in TRAINING:
            raise SftplugError(f"unknown dtype {name!r}; use {', '.join(TRAINING)}")
    cases = [(_five(s), False) for s in shapes]
    if packed:
        cases.append((_five(packed_shape or (CUDA_PACKED if cuda else CPU_PACKED)), True))
    bench = _Bench(registry, device, causal, repeats or (10 if cuda else 3), budget_s, echo)
    rows = []
    for dtype_name in dtypes:
        for shape, is_packed in cases:
            rows += _case_rows(bench, dtype_name, shape, is_packed)
    # Backends that cannot run here at all: one row each, saying why.
    rows += [_unavailable_row(name, why_unavailable, causal)
             for name, why_unavailable in attention_skipped(registry).items()]
    return rows


@dataclass
class _Bench:
    """One bench's settings, and its clock for the time budget."""

    registry: object
    device: torch.device
    causal: bool
    repeats: int
    budget_s: float
    echo: Callable[[dict], None] | None
    started: float = field(default_factory=time.perf_counter)

    @property
    def math_limit(self) -> int:
        return MATH_MAX_SEQ_CUDA if self.device.type == "cuda" else MATH_MAX_SEQ_CPU


def _case_rows(bench: _Bench, dtype_name: str, shape: tuple, is_packed: bool) -> list[dict]:
    """One case's row for every backend offered for it, each echoed when done."""
    B, H, Hkv, S, D = shape
    dtype = BY_NAME[dtype_name]
    request = AttentionRequest("auto", bench.device, dtype, D, H, Hkv, is_packed, S)
    doc_ids = packed_doc_ids(B, S, bench.device, seed=S) if is_packed else None
    flops = attention_flops(B, H, S, D, bench.causal, doc_ids)
    rows = []
    for offer in survey(bench.registry.hook, request):
        backend = offer.backend
        row = {
            "backend": backend.name, "dtype": dtype_name,
            "case": ("packed " if is_packed else "") + _case_name(B, H, Hkv, S, D),
            "B": B, "H": H, "H_kv": Hkv, "S": S, "D": D, "causal": bench.causal, "packed": is_packed,
            "fwd_ms": None, "bwd_ms": None, "fwd_tflops": None, "bwd_tflops": None, "first_ms": None,
            "status": "ok",
        }
        why_skipped = offer.why_unavailable
        if why_skipped is None:
            why_skipped = _why_skipped(bench, backend.name, B, H, S, dtype)
        if why_skipped is not None:
            row["status"] = f"skipped: {why_skipped}"
        else:
            row.update(_timed(bench, backend, shape, dtype, doc_ids, flops))
        rows.append(row)
        if bench.echo is not None:
            bench.echo(row)
    return rows


def _why_skipped(bench: _Bench, name: str, B: int, H: int, S: int, dtype: torch.dtype) -> str | None:
    """Why a backend that could run is not timed: math at long sequences, or the time budget spent."""
    if name == "math" and S > bench.math_limit:
        return (f"math skipped at S={S} (> {bench.math_limit}): it materializes B*H*S^2 scores "
                f"({B * H * S * S * dtype.itemsize / 2**30:.0f} GiB) and would dominate the run")
    if time.perf_counter() - bench.started > bench.budget_s:
        return f"time budget of {bench.budget_s:.0f}s spent"
    return None


def _timed(bench: _Bench, backend, shape: tuple, dtype: torch.dtype, doc_ids, flops: float) -> dict:
    """A row's timings and TFLOP/s, or its status where the backend fails (a failure never stops the bench)."""
    try:
        fwd, bwd, first = _time_backend(backend, *shape, dtype, bench.device, bench.causal, doc_ids, bench.repeats)
        return dict(fwd_ms=fwd, bwd_ms=bwd, first_ms=first, fwd_tflops=flops / fwd / 1e9,
                    bwd_tflops=2.5 * flops / bwd / 1e9)
    except torch.cuda.OutOfMemoryError:
        return {"status": "failed: out of GPU memory"}
    except Exception as exc:  # a backend in development must not stop the bench
        return {"status": f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"}
    finally:
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()


def _unavailable_row(name: str, why_unavailable: str, causal: bool) -> dict:
    return {
        "backend": name, "dtype": "-", "case": "-", "B": None, "H": None, "H_kv": None, "S": None, "D": None,
        "causal": causal, "packed": None, "fwd_ms": None, "bwd_ms": None, "fwd_tflops": None,
        "bwd_tflops": None, "first_ms": None, "status": f"skipped: unavailable here: {why_unavailable}",
    }


def attention_flops(B: int, H: int, S: int, D: int, causal: bool = True, doc_ids=None) -> float:
    """Forward FLOPs: 4*B*H*S^2*D, halved when causal; per document for packed rows."""
    if doc_ids is None:
        square = B * S * S
    else:
        square = sum(n * n for row in document_lengths(doc_ids) for n in row)
    return 4.0 * H * square * D * (0.5 if causal else 1.0)


def _five(shape) -> tuple[int, int, int, int, int]:
    if len(shape) == 4:
        B, H, S, D = shape
        return B, H, H, S, D
    if len(shape) == 5:
        return tuple(shape)
    raise SftplugError(f"a shape is (B, H, S, D) or (B, H, H_kv, S, D), not {shape}")


def _case_name(B, H, Hkv, S, D) -> str:
    heads = f"{H}/{Hkv}" if Hkv != H else f"{H}"
    return f"B{B} H{heads} S{S} D{D}"


def packed_doc_ids(B: int, S: int, device, seed: int) -> torch.Tensor:
    """Rows filled with documents of S/32 .. S/2 tokens (deterministic)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(B):
        row, doc = [], 0
        while len(row) < S:
            n = min(rng.randint(max(S // 32, 1), max(S // 2, 1)), S - len(row))
            row += [doc] * n
            doc += 1
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int32, device=device)


def _time_backend(backend, B, H, Hkv, S, D, dtype, device, causal, doc_ids, repeats):
    """(median forward ms, median backward ms, first forward+backward ms incl. compile)."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, S, D, device=device, dtype=dtype, generator=gen).requires_grad_()
    k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, generator=gen).requires_grad_()
    v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, generator=gen).requires_grad_()
    grad = torch.randn(B, H, S, D, device=device, dtype=dtype, generator=gen)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def step():
        out = backend(q, k, v, causal=causal, doc_ids=doc_ids)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    sync()
    t0 = time.perf_counter()
    step()  # compile / autotune / cuDNN graph build happen here
    sync()
    first = 1000 * (time.perf_counter() - t0)
    step()  # a second warm-up: autotuners and allocators settle after the first call
    fwd, bwd = [], []
    for _ in range(repeats):
        if cuda:
            e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            e[0].record()
            out = backend(q, k, v, causal=causal, doc_ids=doc_ids)
            e[1].record()
            out.backward(grad)
            e[2].record()
            torch.cuda.synchronize(device)
            fwd.append(e[0].elapsed_time(e[1]))
            bwd.append(e[1].elapsed_time(e[2]))
        else:
            t0 = time.perf_counter()
            out = backend(q, k, v, causal=causal, doc_ids=doc_ids)
            t1 = time.perf_counter()
            out.backward(grad)
            t2 = time.perf_counter()
            fwd.append(1000 * (t1 - t0))
            bwd.append(1000 * (t2 - t1))
        q.grad = k.grad = v.grad = None
        del out
    return statistics.median(fwd), statistics.median(bwd), first


def format_table(rows: list[dict]) -> str:
    """The bench as a text table (what `sftplug bench attention` prints without --json)."""
    header = ("backend", "dtype", "case", "fwd ms", "bwd ms", "fwd TFLOP/s", "bwd TFLOP/s", "first ms")
    body, notes = [], []
    for r in rows:
        if r["status"] == "ok":
            body.append((r["backend"], r["dtype"], r["case"], f"{r['fwd_ms']:.3f}", f"{r['bwd_ms']:.3f}",
                         _tf(r["fwd_tflops"]), _tf(r["bwd_tflops"]), f"{r['first_ms']:.0f}"))
        else:
            where = "" if r["case"] == "-" else f" {r['dtype']} {r['case']}"
            notes.append(f"{r['backend']}{where}: {r['status']}")
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(header)]
    numeric = {3, 4, 5, 6, 7}

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), line(["-" * w for w in widths])] + [line(b) for b in body]
    best = _fastest(rows)
    if best:
        out += ["", "fastest forward+backward per case:"]
        out += [f"  {case}: {name} ({ms:.3f} ms)" for case, (name, ms) in best.items()]
    if notes:
        out += ["", "not timed:"] + [f"  {n}" for n in _dedupe(notes)]
    if rows:
        causal = "causal" if rows[0]["causal"] else "non-causal"
        out += ["", f"{causal}; FLOPs = 4*B*H*S^2*D{' x0.5' if rows[0]['causal'] else ''} forward "
                    "(per document when packed), backward x2.5; first ms includes compilation"]
    return "\n".join(out)


def _tf(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.1f}"


def _fastest(rows) -> dict:
    best: dict[str, tuple[str, float]] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        key = f"{r['dtype']} {r['case']}"
        total = r["fwd_ms"] + r["bwd_ms"]
        if key not in best or total < best[key][1]:
            best[key] = (r["backend"], total)
    return best


def _dedupe(items):
    seen, out = set(), []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out
