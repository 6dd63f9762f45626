"""What this machine runs and how fast: ``sftplug plugins``, ``sftplug doctor``, ``sftplug bench``."""

from __future__ import annotations

import json

import click

from sftplug.cli.options import CONTEXT, user_errors
from sftplug.dtypes import TRAINING
from sftplug.errors import SftplugError


@click.command(context_settings=CONTEXT, short_help="List every plugin, its hooks, and whether it runs here.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@user_errors
def plugins(as_json):
    """List every plugin, its hooks, and why it is unavailable if it is."""
    from sftplug.registry import build_registry

    registry = build_registry()
    if as_json:
        click.echo(json.dumps([p.as_dict() for p in registry.plugins], indent=2))
        return
    click.echo(f"{'PLUGIN':<20} {'STATUS':<12} {'SOURCE':<16} HOOKS")
    for p in registry.plugins:
        status = "ok" if p.available else "unavailable"
        hooks = ", ".join(p.hooks) or "-"
        click.echo(f"{p.name:<20} {status:<12} {p.source:<16} {hooks}")
        if not p.available:
            click.echo(f"{'':<20} reason: {p.why_unavailable}")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise SftplugError(f"--shape takes B,H,S,D or B,H,H_kv,S,D, not {text!r}") from None
    if len(shape) not in (4, 5) or min(shape) < 1:
        raise SftplugError(f"--shape takes B,H,S,D or B,H,H_kv,S,D (positive), not {text!r}")
    return shape


@click.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--device", default="auto", show_default=True, help="Judge attention for auto, cpu or cuda[:N].")
@click.option("--head-dim", type=int, default=64, show_default=True, help="Head dim to check backends for.")
@click.option("--heads", type=int, default=32, show_default=True, help="Query heads.")
@click.option("--kv-heads", type=int, default=4, show_default=True, help="Key/value heads (GQA).")
@click.option("--compile", "compile_report", is_flag=True,
              help="Instead: compile every Triton attention config for sm_80 and sm_90a (no GPU needed; minutes).")
@user_errors
def doctor(as_json, device, head_dim, heads, kv_heads, compile_report):
    """Show what this machine can run and what is steering it.

    Prints the torch, CUDA, cuDNN and Triton versions; the GPU and its compute
    capability; for every attention backend whether it runs bf16, fp16 and fp32 here
    (and PyTorch's reason where it does not), whether GQA avoids K/V copies and packed
    rows are kept apart; what `--attention auto` picks per dtype; and the environment
    variables (PYTORCH_SDP_KERNEL, SDPA_BACKEND, TORCH_CUDNN_SDPA_* ...) and global SDPA
    switches that try to steer attention kernels (sftplug ignores them).

    \b
    Examples:
      sftplug doctor
      sftplug doctor --json
      sftplug doctor --head-dim 128 --heads 32 --kv-heads 8
      sftplug doctor --compile        # shared memory, registers, spills, wgmma per kernel config
    """
    if compile_report:
        from sftplug.kernels.compile_report import format_report, report

        rows = report()
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2) if as_json else format_report(rows))
        if not all(r.ok for r in rows):
            raise SftplugError("some Triton attention configs spill, miss wgmma or exceed shared memory (see above)")
        return
    from sftplug.diagnostics.doctor import doctor_report, format_doctor
    from sftplug.probes import resolve_device
    from sftplug.registry import build_registry

    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise SftplugError(f"--heads must be a positive multiple of --kv-heads, got {heads} and {kv_heads}")
    report = doctor_report(build_registry(), resolve_device(device), head_dim, heads, kv_heads)
    click.echo(json.dumps(report, indent=2) if as_json else format_doctor(report))


@click.command("attention", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (a list of rows).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(TRAINING),
              help="Repeatable. Default: bf16 and fp16 on CUDA, fp32 on the CPU.")
@click.option("--shape", "shapes", multiple=True,
              help="Repeatable B,H,S,D or B,H,H_kv,S,D. Default: the shapes listed above for the device.")
@click.option("--packed/--no-packed", default=True, show_default=True, help="Also time a packed-documents case.")
@click.option("--causal/--no-causal", default=True, show_default=True,
              help="Causal attention, as training uses, or every query attending to every key.")
@click.option("--repeats", type=int, help="Timed iterations per row (default 10 on CUDA, 3 on the CPU).")
@click.option("--budget", type=float, default=150.0, show_default=True,
              help="Seconds after which remaining rows are skipped.")
@click.option("--jsonl", "jsonl", type=click.Path(dir_okay=False),
              help="Also append each row to this file as a JSON line as soon as it is timed.")
@user_errors
def bench_attention(as_json, device, dtypes, shapes, packed, causal, repeats, budget, jsonl):
    """Time forward and backward of every attention backend.

    Prints a table: backend, dtype, case (B, H[/H_kv], S, D, or packed), forward and
    backward ms (median), TFLOP/s (4*B*H*S^2*D, x0.5 causal, backward x2.5) and the first
    call's ms (compilation); then the fastest backend per case and why others were not
    timed. On CUDA the cases are (B,H,S,D) = (8,32,2048,64), (4,32,2048,128),
    (2,32,8192,128), (2,32,4096,128), W1's shape with GQA (B,H,H_kv,S,D) = (8,32,4,2048,64)
    and packed rows (4,32,4,4096,128) of documents of 128 to 2048 tokens, in bf16 and fp16
    (under 3 minutes on an H100; math is skipped beyond S=4096). On the CPU they are
    (1,4,256,64), (1,8,2,256,64) and packed (2,4,2,512,64), in fp32.

    \b
    Examples:
      sftplug bench attention
      sftplug bench attention --json > attention.json
      sftplug bench attention --dtype bf16 --shape 8,32,2048,64 --shape 8,32,4,2048,64
    """
    from sftplug.diagnostics.attention_bench import format_table, run_attention_bench
    from sftplug.probes import resolve_device
    from sftplug.registry import build_registry

    if repeats is not None and repeats < 1:
        raise SftplugError("--repeats must be at least 1")
    target = resolve_device(device)
    rows = run_attention_bench(
        build_registry(),
        shapes=[_shape(s) for s in shapes] or None,
        dtypes=list(dtypes) or None,
        device=target,
        packed=packed,
        repeats=repeats,
        causal=causal,
        budget_s=budget,
        echo=_reporter(jsonl),
    )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(format_table(rows))


def _reporter(jsonl: str | None):
    """Each row as it finishes: a line on stderr (stdout keeps the table or the JSON), and a JSON
    line appended to ``jsonl`` if given."""

    def report(row: dict) -> None:
        result = f"{row['fwd_ms']:.3f} + {row['bwd_ms']:.3f} ms" if row["status"] == "ok" else row["status"]
        click.echo(f"  {row['backend']} {row['dtype']} {row['case']}: {result}", err=True)
        if jsonl:
            with open(jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")

    return report


@click.group(context_settings=CONTEXT)
def bench():
    """Benchmarks.

    \b
    Examples:
      sftplug bench attention
      sftplug bench linear-attention
      sftplug bench ops
      sftplug bench step --workload W0
    """


bench.add_command(bench_attention)


def _linear_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) not in (5, 6) or min(shape) < 1:
        raise SftplugError(f"--shape takes B,T,Hk,Hv,D or B,T,Hk,Hv,Dk,Dv (positive), not {text!r}")
    return shape


@bench.command("linear-attention", context_settings=CONTEXT,
               short_help="Time forward and backward of every linear-attention backend.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (a list of rows).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(TRAINING),
              help="Repeatable. Default: bf16 on CUDA, fp32 on the CPU.")
@click.option("--shape", "shapes", multiple=True,
              help="Repeatable B,T,Hk,Hv,D or B,T,Hk,Hv,Dk,Dv (rows, tokens, q/k heads, value heads, head dims). "
              "Default: the device's cases listed above.")
@click.option("--packed/--no-packed", default=True, show_default=True, help="Also time a packed-documents case.")
@click.option("--repeats", type=int, help="Timed iterations per row (default 10 on CUDA, 3 on the CPU).")
@click.option("--budget", type=float, default=150.0, show_default=True,
              help="Seconds after which remaining rows are skipped.")
@click.option("--jsonl", "jsonl", type=click.Path(dir_okay=False),
              help="Also append each row to this file as a JSON line as soon as it is timed.")
@user_errors
def bench_linear_attention(as_json, device, dtypes, shapes, packed, repeats, budget, jsonl):
    """Time forward and backward of every linear-attention backend (Gated DeltaNet's gated delta rule).

    Prints backend, dtype, case (B rows of T tokens, Hk/Hv heads of D), forward and backward ms
    (median), thousands of tokens per forward + backward, the first call's ms (compilation) and
    the largest difference of the output and the gradients from the PyTorch form's; then why
    other backends were not timed. On CUDA the cases are Qwen3.5's linear-attention layer
    (4B and 9B alike), B,T,Hk,Hv,D = 2,4096,16,32,128, plain and packed with documents of 128
    to 2048 tokens, in bf16; on the CPU W0-Hybrid's layer 4,512,4,8,64 and packed 2,512,2,4,64,
    in fp32.

    \b
    Examples:
      sftplug bench linear-attention
      sftplug bench linear-attention --dtype fp16 --shape 1,8192,16,32,128
      sftplug bench linear-attention --device cpu --shape 1,256,2,4,64 --no-packed --json
    """
    from sftplug.diagnostics.linear_attention_bench import format_table, run_linear_attention_bench
    from sftplug.probes import resolve_device
    from sftplug.registry import build_registry

    if repeats is not None and repeats < 1:
        raise SftplugError("--repeats must be at least 1")
    rows = run_linear_attention_bench(build_registry(), shapes=[_linear_shape(s) for s in shapes] or None,
                                      dtypes=list(dtypes) or None, device=resolve_device(device), packed=packed,
                                      repeats=repeats, budget_s=budget, echo=_reporter(jsonl))
    click.echo(json.dumps(rows, indent=2) if as_json else format_table(rows))


@bench.command("ops", context_settings=CONTEXT, short_help="Time each fused op's forms against PyTorch's.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--device", default="auto", show_default=True, help="cuda, cpu or auto.")
@click.option("--dtype", type=click.Choice(TRAINING), help="Default: bf16 on CUDA, fp32 on the CPU.")
@click.option("--workload", type=click.Choice(["W0", "W1"]),
              help="The sizes of workload W0 or W1 (see bench step). Default: W1 on CUDA, W0 on the CPU.")
@click.option("--repeats", type=int, default=10, show_default=True, help="Timed repetitions per row.")
@user_errors
def bench_ops(as_json, device, dtype, workload, repeats):
    """Time each fused op's forms (RMSNorm, the gated MLP, RoPE, the loss) against PyTorch's.

    Prints op, form, sizes, forward and backward ms (medians), GB/s of the least memory
    traffic the op needs, the speed-up over PyTorch's form and the largest difference from
    its result. On the CPU fused Triton forms run in the interpreter (TRITON_INTERPRET=1):
    they are checked there, not timed.

    \b
    Examples:
      sftplug bench ops
      sftplug bench ops --dtype fp16 --json > ops.json
      TRITON_INTERPRET=1 sftplug bench ops --device cpu
    """
    from sftplug.diagnostics.ops_bench import format_table, ops_request, run_ops_bench
    from sftplug.dtypes import as_dtype
    from sftplug.probes import resolve_device
    from sftplug.registry import build_registry

    if repeats < 1:
        raise SftplugError("--repeats must be at least 1")
    target = resolve_device(device)
    request = ops_request(target, as_dtype(dtype or ("bf16" if target.type == "cuda" else "fp32")), workload)

    def report(row: dict) -> None:
        timed = f"{row['fwd_ms']:.3f} + {row['bwd_ms'] or 0:.3f} ms" if row["fwd_ms"] is not None else row["status"]
        click.echo(f"  {row['op']} {row['form']}: {timed}", err=True)

    rows = run_ops_bench(build_registry(), request, repeats=repeats, echo=report)
    click.echo(json.dumps(rows, indent=2) if as_json else format_table(rows))


@bench.command("step", context_settings=CONTEXT, short_help="Time sftplug against HF transformers + PEFT.")
@click.option(
    "--workload",
    type=click.Choice(["W0", "W1", "W0-MoE", "W1-MoE", "W0-Hybrid"]),
    default="W0",
    show_default=True,
    help="W0: CPU, fp32, preset w0 (hidden 512, 6 layers), 4 rows of 512 tokens; W1: GPU, bf16, preset w1 "
    "(TinyLlama-1.1B's shape), 8 rows of 2048 tokens. Both: LoRA r=16 on every projection (BENCHMARKS.md). "
    "W0-MoE / W1-MoE: mixtures of experts (presets w0-moe, w1-moe) against Qwen3-MoE + PEFT, LoRA on the "
    "attention projections and the experts. W0-Hybrid: W0's sizes as Qwen3.5 (preset w0-hybrid, 8 layers, three "
    "Gated DeltaNet layers to one gated attention layer) against Qwen3.5 + PEFT, LoRA on every projection.",
)
@click.option("--full", is_flag=True, help="Full fine-tuning instead of LoRA.")
@click.option("--rounds", type=int, default=2, show_default=True, help="Alternating rounds of both sides.")
@click.option("--steps", type=int, default=5, show_default=True, help="Timed updates per side and round.")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed updates first.")
@click.option("--attention", default="auto", show_default=True,
              help="sftplug's attention backend (see `sftplug plugins`); the HF side uses SDPA.")
@click.option(
    "--variant",
    "variants",
    multiple=True,
    type=click.Choice(["compile", "workers2", "fused", "unfused"]),
    help="Also time sftplug with --torch-compile, --workers 2, --fused all or --fused none (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@user_errors
def bench_step(workload, full, rounds, steps, warmup, attention, variants, as_json):
    """Time sftplug against HF transformers + PEFT on the same workload.

    Each side runs in its own process, in rounds that alternate the order; prints
    tokens/s, forward / backward / optimizer ms and peak memory for both, and the ratios.
    Exits 1 when a side failed (the others are still reported).

    \b
    Examples:
      sftplug bench step --workload W0
      sftplug bench step --workload W1 --rounds 1 --json
      sftplug bench step --workload W1 --variant compile --variant workers2
      sftplug bench step --workload W1 --variant fused --variant unfused
    """
    from sftplug.diagnostics.step_bench import bench_step as run_bench
    from sftplug.diagnostics.step_bench import format_step_table

    result = run_bench(workload, rounds=rounds, steps=steps, warmup=warmup, full=full, attention=attention,
                       variants=variants, echo=lambda line: click.echo(line, err=True))
    click.echo(json.dumps(result, indent=2) if as_json else format_step_table(result))
    if result["errors"]:  # a partial comparison must not pass for a whole one in a script
        raise SystemExit(1)


@click.command(context_settings=CONTEXT, short_help="Plot runs' loss, learning rate, grad norm and tok/s.")
@click.argument("folders", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "out_file", type=click.Path(dir_okay=False),
              help="The PNG to write. Default: FOLDER/plot.png for one run; required for several.")
@user_errors
def plot(folders, out_file):
    """Plot loss (with eval loss), learning rate, gradient norm and tokens/s of the run FOLDERS.

    Reads each run folder's metrics.jsonl; several folders are overlaid, named by their
    folder in the legend. Needs matplotlib (pip install 'sftplug[plot]').

    \b
    Examples:
      sftplug plot runs/default
      sftplug plot runs/lr3e-3 runs/lr1e-3 --out compare.png
    """
    from sftplug.diagnostics.plot import plot_runs

    click.echo(f"plot: {plot_runs(folders, out_file)}")
