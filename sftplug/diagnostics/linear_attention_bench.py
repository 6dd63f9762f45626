"""`sftplug bench linear-attention`: forward and backward time of every linear-attention backend
(the gated delta rule of Gated DeltaNet layers: sftplug.linear_attention).

A case is (B, T, Hk, Hv, Dk, Dv): rows, tokens per row, q/k heads, value heads and their head dims.
On CUDA the default is Qwen3.5's linear-attention layer (the 4B's and the 9B's alike: 16 q/k and
32 value heads of 128) at T=4096, two rows, in bf16, plus the same rows packed with documents;
on the CPU W0-Hybrid's layer (4 rows of 512, 4/8 heads of 64) and a small packed case, in fp32.
Every backend a plugin offers is timed where its check passes (its check includes a first run
against the PyTorch form); the others get a row saying why not. Each row also gives the largest
difference of the output and of the gradients from the PyTorch form's on the same inputs,
relative to the largest value (the PyTorch form's own row: 0).

Inputs are as the Gated DeltaNet mixer passes them: q and k L2-normalised in fp32, v and β in the
compute dtype, the log decay g in fp32. GPU times come from CUDA events, CPU times from
perf_counter (medians of ``repeats`` after two untimed calls).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from sftplug import probes
from sftplug.diagnostics.attention_bench import packed_doc_ids
from sftplug.dtypes import BY_NAME, TRAINING, dtype_name
from sftplug.errors import SftplugError
from sftplug.linear_attention.backend import LinearAttentionRequest
from sftplug.linear_attention.choice import linear_attention_skipped, survey

CUDA_SHAPES = [(2, 4096, 16, 32, 128, 128)]  # Qwen3.5-4B/9B's linear-attention layer, 2 rows of 4096
CUDA_PACKED = (2, 4096, 16, 32, 128, 128)  # rows of documents of 128..2048 tokens
CPU_SHAPES = [(4, 512, 4, 8, 64, 64)]  # W0-Hybrid's layer (BENCHMARKS.md)
CPU_PACKED = (2, 512, 2, 4, 64, 64)
BUDGET_S = 150.0  # rows not started after this are skipped
REFERENCE = "pytorch"  # the form every backend is compared with


def run_linear_attention_bench(registry, shapes=None, dtypes=None, device=None, packed: bool = True,
                               packed_shape=None, repeats: int | None = None, budget_s: float = BUDGET_S,
                               echo=None) -> list[dict]:
    """Time every offered linear-attention backend on every case; one dict per (backend, case).

    :param shapes: (B, T, Hk, Hv, D) or (B, T, Hk, Hv, Dk, Dv) tuples; default the device's above.
    :param dtypes: names ("bf16", "fp16", "fp32"); default bf16 on CUDA, fp32 on the CPU.
    :param packed: also time a packed-documents case (``packed_shape``, rows of documents of T/32 .. T/2).
    :param repeats: timed calls per row (median); default 10 on CUDA, 3 on the CPU.
    :param echo: called with each row as it finishes, or None.
    :returns: rows with ``backend, dtype, case, B, T, Hk, Hv, Dk, Dv, packed, fwd_ms, bwd_ms, first_ms,
        ktok_s, out_err, grad_err, status`` ("ok", or "skipped: why" / "failed: why" with the timings None).
    """
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if probes.cuda_available() else torch.device("cpu"))
    cuda = device.type == "cuda"
    if cuda and not probes.cuda_available():
        raise SftplugError(f"cannot bench on {device}: {probes.why_no_gpu()}")
    dtypes = list(dtypes or (("bf16",) if cuda else ("fp32",)))
    for name in dtypes:
        if name not in TRAINING:
            raise SftplugError(f"unknown dtype {name!r}; use {', '.join(TRAINING)}")
    cases = [(_six(s), False) for s in (shapes or (CUDA_SHAPES if cuda else CPU_SHAPES))]
    if packed:
        cases.append((_six(packed_shape or (CUDA_PACKED if cuda else CPU_PACKED)), True))
    started, rows = time.perf_counter(), []
    for name in dtypes:
        for shape, is_packed in cases:
            over = time.perf_counter() - started > budget_s
            rows += _case_rows(registry, device, BY_NAME[name], shape, is_packed, repeats or (10 if cuda else 3),
                               f"time budget of {budget_s:.0f}s spent" if over else None, echo)
    rows += [_row(name, "-", "-", None, False, f"skipped: unavailable here: {why}")
             for name, why in linear_attention_skipped(registry).items()]
    return rows


def _case_rows(registry, device, dtype, shape, is_packed, repeats, why_skipped, echo) -> list[dict]:
    """One case's row for every backend offered for it, the PyTorch form first (the others are compared with it)."""
    b, t, hk, hv, dk, dv = shape
    request = LinearAttentionRequest("auto", device, dtype, hk, hv, dk, dv, is_packed, t)
    offers = sorted(survey(registry.hook, request), key=lambda o: o.name != REFERENCE)
    inputs = _inputs(shape, dtype, device)
    doc_ids = packed_doc_ids(b, t, device, seed=t) if is_packed else None
    reference, rows = None, []
    for offer in offers:
        row = _row(offer.name, dtype_name(dtype), _case_name(shape, is_packed), shape, is_packed, "ok")
        why = offer.why_unavailable or why_skipped
        if why is not None:
            row["status"] = f"skipped: {why}"
        else:
            result = _timed(offer.backend, inputs, doc_ids, device, repeats)
            if isinstance(result, str):
                row["status"] = result
            else:
                timings, got = result
                row.update(timings, ktok_s=b * t / (timings["fwd_ms"] + timings["bwd_ms"]))
                if offer.name == REFERENCE:
                    reference = got
                if reference is not None:
                    row.update(out_err=_relative(got[0], reference[0]),
                               grad_err=max(_relative(a, r) for a, r in zip(got[1:], reference[1:])))
        rows.append(row)
        if echo is not None:
            echo(row)
    return rows


def _inputs(shape, dtype, device) -> list[torch.Tensor]:
    """q, k [B, T, Hk, Dk] normalised (fp32), v [B, T, Hv, Dv], g [B, T, Hv] (fp32, in [-1, 0)), β [B, T, Hv]."""
    b, t, hk, hv, dk, dv = shape
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*size):
        return torch.rand(*size, device=device, generator=gen)

    q, k = (F.normalize(torch.randn(b, t, hk, dk, device=device, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(b, t, hv, dv, device=device, generator=gen).to(dtype)
    return [q, k, v, -rand(b, t, hv), rand(b, t, hv).to(dtype)]


def _timed(backend, inputs, doc_ids, device, repeats):
    """((fwd_ms, bwd_ms, first_ms), [output, gradients]) of ``backend``, or the row's status where it fails."""
    cuda = device.type == "cuda"
    x = [a.detach().requires_grad_() for a in inputs]
    grad = torch.randn(inputs[2].shape, device=device, generator=torch.Generator(device=device).manual_seed(1)
                       ).to(inputs[2].dtype)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def clock():
        sync()
        return time.perf_counter()

    try:
        t0 = clock()
        out = backend(*x, doc_ids)
        got = [out.detach(), *torch.autograd.grad(out, x, grad)]
        first = 1000 * (clock() - t0)  # compilation and autotuning happen here
        torch.autograd.grad(backend(*x, doc_ids), x, grad)  # allocators and autotuners settle
        fwd, bwd = [], []
        for _ in range(repeats):
            t0 = clock()
            out = backend(*x, doc_ids)
            t1 = clock()
            torch.autograd.grad(out, x, grad)
            t2 = clock()
            fwd.append(1000 * (t1 - t0))
            bwd.append(1000 * (t2 - t1))
        return dict(fwd_ms=statistics.median(fwd), bwd_ms=statistics.median(bwd), first_ms=first), got
    except torch.cuda.OutOfMemoryError:
        return "failed: out of GPU memory"
    except Exception as exc:  # a backend in development must not stop the bench
        return f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    finally:
        if cuda:
            torch.cuda.empty_cache()


def _relative(got, want) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def _row(backend, dtype, case, shape, is_packed, status) -> dict:
    b, t, hk, hv, dk, dv = shape or (None,) * 6
    return {"backend": backend, "dtype": dtype, "case": case, "B": b, "T": t, "Hk": hk, "Hv": hv, "Dk": dk, "Dv": dv,
            "packed": is_packed, "fwd_ms": None, "bwd_ms": None, "first_ms": None, "ktok_s": None, "out_err": None,
            "grad_err": None, "status": status}


def _six(shape) -> tuple[int, int, int, int, int, int]:
    if len(shape) == 5:
        return (*shape, shape[-1])
    if len(shape) == 6:
        return tuple(shape)
    raise SftplugError(f"a linear-attention case is B,T,Hk,Hv,D or B,T,Hk,Hv,Dk,Dv, not {shape}")


def _case_name(shape, is_packed: bool) -> str:
    b, t, hk, hv, dk, dv = shape
    return ("packed " if is_packed else "") + f"B{b} T{t} H{hk}/{hv} D{dk}" + (f"/{dv}" if dv != dk else "")


def format_table(rows: list[dict]) -> str:
    """The bench as a text table (what `sftplug bench linear-attention` prints without --json)."""
    header = ("backend", "dtype", "case", "fwd ms", "bwd ms", "k tok/s", "first ms", "out err", "grad err")
    body, notes = [], []
    for r in rows:
        if r["status"] == "ok":
            errors = [f"{r[k]:.1e}" if r[k] is not None else "-" for k in ("out_err", "grad_err")]
            body.append((r["backend"], r["dtype"], r["case"], f"{r['fwd_ms']:.2f}",
                         f"{r['bwd_ms']:.2f}", f"{r['ktok_s']:.1f}", f"{r['first_ms']:.0f}", *errors))
        else:
            where = "" if r["case"] == "-" else f" {r['dtype']} {r['case']}"
            notes.append(f"{r['backend']}{where}: {r['status']}")
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), line(["-" * w for w in widths]), *map(line, body)]
    if notes:
        out += ["", "not timed:", *(f"  {n}" for n in dict.fromkeys(notes))]
    out += ["", "k tok/s: rows x tokens per forward + backward; errors: the largest difference from the "
                f"{REFERENCE} form's output and gradients over its largest value; first ms includes compilation"]
    return "\n".join(out)

