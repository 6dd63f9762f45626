"""`sftplug bench ops`: each fused form against the PyTorch form of its op, at W1's sizes on a
GPU (W0's on the CPU), forward and backward.

Rows: op, form, sizes, forward and backward ms (medians), GB/s (the least memory traffic the
op needs, over its time), speed-up over PyTorch's form, and the largest difference from
PyTorch's result (outputs and gradients, relative to the largest value). Under the Triton
interpreter (the CPU) a fused form is checked, not timed: its times say nothing there.
"""

from __future__ import annotations

import dataclasses

import torch

from sftplug.dtypes import dtype_name
from sftplug.fused import OPS, FusedOpsRequest, pytorch
from sftplug.fused.choice import PYTORCH, survey
from sftplug.fused.timing import case_for, outputs, time_op

# (hidden, intermediate, head dim, query heads, kv heads, vocab, tokens of a micro-batch): W0 and W1 (BENCHMARKS.md)
SIZES = {"W0": (512, 1376, 64, 8, 4, 8192, 2048), "W1": (2048, 5632, 64, 32, 4, 32000, 16384)}
# grouped_linear's mixture of experts at each: (experts, expert intermediate, top_k); W1's is
# Qwen3-30B-A3B's (hidden 2048 as W1's). Its LoRA has sftplug's default rank on the experts.
MOE_SIZES = {"W0": (8, 256, 2), "W1": (128, 768, 8)}
MOE_LORA_RANK = 16
CHECK_ROWS = 64  # rows a fused form is checked on under the interpreter


def ops_request(device: torch.device, dtype: torch.dtype, workload: str | None = None) -> FusedOpsRequest:
    workload = workload or ("W1" if device.type == "cuda" else "W0")
    hidden, intermediate, head_dim, heads, kv_heads, vocab, tokens = SIZES[workload]
    experts, expert_intermediate, top_k = MOE_SIZES[workload]
    return FusedOpsRequest(device=device, dtype=dtype, hidden_size=hidden, intermediate_size=intermediate,
                           head_dim=head_dim, rotary_dim=head_dim, n_heads=heads, n_kv_heads=kv_heads,
                           vocab_size=vocab, tokens=tokens, experts=experts,
                           expert_intermediate_size=expert_intermediate, top_k=top_k, lora_rank=MOE_LORA_RANK)


def run_ops_bench(registry, request: FusedOpsRequest, repeats: int = 10, echo=None) -> list[dict]:
    """One row per op and form (PyTorch's first); ``echo`` gets each row as it is done."""
    offers = survey(registry.hook, request)
    rows = []
    for op in filter(request.uses, OPS):  # grouped_linear only for a request with experts
        case = case_for(op, request)
        baseline = _timed_row(op, PYTORCH, getattr(pytorch, op), case, repeats)
        found = [baseline]
        for offer in offers[op]:
            row = dict(op=op, form=offer.name, shape=case.shape, dtype=dtype_name(request.dtype), fwd_ms=None,
                       bwd_ms=None, gb_s=None, speedup=None, difference=None, status=offer.why_unavailable or "ok")
            if offer.why_unavailable is None:
                row["difference"] = _difference(offer.backend, getattr(pytorch, op), op, request)
                if request.device.type == "cuda":
                    row.update(_timed_row(op, offer.name, offer.backend, case, repeats))
                    row["speedup"] = _total(baseline) / _total(row)
                else:
                    row["status"] = "checked, not timed: on the CPU it runs in the Triton interpreter"
            found.append(row)
        for row in found:
            rows.append(row)
            if echo is not None:
                echo(row)
    return rows


def _timed_row(op, name, form, case, repeats) -> dict:
    fwd, bwd = time_op(form, case, reps=repeats)
    seconds = (fwd + (bwd or 0.0)) / 1e3
    return dict(op=op, form=name, shape=case.shape, dtype=dtype_name(case.dtype), fwd_ms=fwd, bwd_ms=bwd,
                gb_s=(case.bytes_forward + (case.bytes_backward if bwd is not None else 0)) / seconds / 1e9,
                speedup=1.0 if name == PYTORCH else None, difference=0.0 if name == PYTORCH else None, status="ok")


def _total(row: dict) -> float:
    return row["fwd_ms"] + (row["bwd_ms"] or 0.0)


def _difference(form, reference, op: str, request: FusedOpsRequest) -> float:
    """The largest difference of the form's outputs and gradients from PyTorch's, relative to the largest value."""
    case = case_for(op, dataclasses.replace(request, tokens=min(request.tokens, CHECK_ROWS)))
    with torch.autocast(request.device.type, enabled=False):
        got, want = outputs(form, *case.make()), outputs(reference, *case.make())
    return max(float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))
               for a, b in zip(got, want))


def format_table(rows: list[dict]) -> str:
    header = f"{'op':<14}{'form':<9}{'sizes':<20}{'dtype':<6}{'fwd ms':>9}{'bwd ms':>9}{'GB/s':>8}{'speed-up':>10}" \
             f"{'difference':>12}  status"
    lines = [header]
    for r in rows:
        lines.append(f"{r['op']:<14}{r['form']:<9}{r['shape']:<20}{r['dtype']:<6}{_cell(r['fwd_ms'], '.3f', 9)}"
                     f"{_cell(r['bwd_ms'], '.3f', 9)}{_cell(r['gb_s'], '.0f', 8)}{_cell(r['speedup'], '.2f', 10, 'x')}"
                     f"{_cell(r['difference'], '.1e', 12)}  {r['status']}")
    return "\n".join(lines)


def _cell(value, spec: str, width: int, unit: str = "") -> str:
    return f"{format(value, spec) + unit if value is not None else '-':>{width}}"
