"""The sftplug command line: a click group, options grouped as reusable decorators."""

from __future__ import annotations

import json
import os
import sys

import click

from sftplug import __version__
from sftplug import dtypes
from sftplug.config import COMPILE_MODES, DEFAULT_LORA_TARGETS, SCHEDULES, TrainConfig
from sftplug.cli.diagnostics import bench, doctor
from sftplug.cli.options import CONTEXT, options, user_errors

model_options = options(
    click.option(
        "--model", default=TrainConfig.model, show_default=True, help="Preset name, HF folder or sftplug checkpoint."
    ),
    click.option("--device", default=TrainConfig.device, show_default=True, help="auto, cpu, cuda or cuda:N."),
)

data_options = options(
    click.option("--data", type=click.Path(dir_okay=False), help="Training records (JSONL or JSON array)."),
    click.option("--eval-data", type=click.Path(dir_okay=False), help="Held-out records for eval loss."),
    click.option("--seq-len", type=int, default=TrainConfig.seq_len, show_default=True, help="Tokens per packed row."),
    click.option(
        "--pack/--no-pack", default=TrainConfig.pack, show_default=True, help="Pack several documents per row."
    ),
    click.option(
        "--eval-split",
        type=float,
        default=TrainConfig.eval_split,
        show_default=True,
        help="Fraction of --data held out.",
    ),
    click.option(
        "--format",
        type=click.Choice(["auto", "chat", "prompt", "alpaca", "text"]),
        default=TrainConfig.format,
        show_default=True,
    ),
    click.option("--chat-template", help="Built-in template name (sftplug, chatml) or a Jinja file."),
    click.option(
        "--overlong", type=click.Choice(["truncate", "drop"]), default=TrainConfig.overlong, show_default=True
    ),
    click.option("--skip-bad-records", is_flag=True, help="Skip and count bad records instead of stopping."),
    click.option("--train-on-prompt", is_flag=True, help="Also train on prompt tokens."),
)

optim_options = options(
    click.option("--steps", type=int, default=TrainConfig.steps, show_default=True, help="Optimizer updates."),
    click.option(
        "--micro-bsz", type=int, default=TrainConfig.micro_bsz, show_default=True, help="Rows per micro-batch."
    ),
    click.option("--accum", type=int, default=TrainConfig.accum, show_default=True, help="Micro-batches per update."),
    click.option("--lr", type=float, default=TrainConfig.lr, show_default=True, help="Peak learning rate."),
    click.option("--warmup", type=int, default=TrainConfig.warmup, show_default=True, help="Warmup updates."),
    click.option("--schedule", type=click.Choice(SCHEDULES), default=TrainConfig.schedule, show_default=True),
    click.option("--weight-decay", type=float, default=TrainConfig.weight_decay, show_default=True),
    click.option(
        "--max-grad-norm",
        type=float,
        default=TrainConfig.max_grad_norm,
        show_default=True,
        help="0 disables clipping.",
    ),
    click.option("--seed", type=int, default=TrainConfig.seed, show_default=True),
)

lora_options = options(
    click.option("--full", is_flag=True, help="Full fine-tuning instead of LoRA."),
    click.option("--lora-r", type=int, default=TrainConfig.lora_r, show_default=True),
    click.option("--lora-alpha", type=float, default=TrainConfig.lora_alpha, show_default=True),
    click.option("--lora-dropout", type=float, default=TrainConfig.lora_dropout, show_default=True),
    click.option(
        "--lora-targets",
        default=",".join(DEFAULT_LORA_TARGETS),
        show_default=True,
        help="Comma-separated linear layers of the blocks.",
    ),
)

runtime_options = options(
    click.option(
        "--dtype", type=click.Choice(dtypes.TRAINING), default=TrainConfig.dtype, show_default=True,
        help="Training precision.",
    ),
    click.option("--tf32", is_flag=True, help="TF32 matmuls for fp32 on Ampere+ GPUs."),
    click.option(
        "--attention",
        default=TrainConfig.attention,
        show_default=True,
        help="Attention backend (see `sftplug plugins`).",
    ),
    click.option("--grad-ckpt", is_flag=True, help="Activation checkpointing per block."),
    click.option("--torch-compile", is_flag=True, help="Compile each transformer block (time reported apart)."),
    click.option(
        "--compile-mode", type=click.Choice(COMPILE_MODES), default=TrainConfig.compile_mode, show_default=True
    ),
    click.option(
        "--strategy",
        type=click.Choice(["ddp", "fsdp"]),
        default=TrainConfig.strategy,
        show_default=True,
        help="Under torchrun: replicate the model (ddp) or shard it with FSDP2 (fsdp, with --full).",
    ),
    click.option(
        "--workers",
        type=int,
        default=TrainConfig.workers,
        show_default=True,
        help="DataLoader workers prefetching batches.",
    ),
    click.option("--profile", is_flag=True, help="Print forward/backward/optimizer ms per update."),
    click.option(
        "--nproc",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Start N local processes (torchrun --standalone); see --strategy.",
    ),
)

run_options = options(
    click.option("--out", default=TrainConfig.out, show_default=True, help="Run folder."),
    click.option("--log-every", type=int, default=TrainConfig.log_every, show_default=True),
    click.option(
        "--eval-every", type=int, default=TrainConfig.eval_every, show_default=True, help="0: before and after only."
    ),
    click.option(
        "--save-every", type=int, default=TrainConfig.save_every, show_default=True, help="0: at the end only."
    ),
    click.option(
        "--keep-last", type=int, default=TrainConfig.keep_last, show_default=True, help="0 keeps every checkpoint."
    ),
    click.option("--resume", help="auto (newest complete checkpoint of --out), or a checkpoint folder."),
    click.option(
        "--on-nonfinite",
        type=click.Choice(["stop", "skip"]),
        default=TrainConfig.on_nonfinite,
        show_default=True,
        help="A NaN/inf loss stops the run (keeping the last checkpoint) or skips the update.",
    ),
    click.option("--sample-prompt", help="Prompt answered before and after training."),
)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", "-V", prog_name="sftplug")
def cli():
    """sftplug: supervised fine-tuning for Llama-family models, built from plugins.

    \b
    Examples:
      sftplug train                          # the built-in demo run on the CPU
      sftplug train --attention efficient --dtype bf16 --model ./Llama-3.2-1B --data chat.jsonl
      sftplug plugins --json
      sftplug generate runs/default "Count from 4 to 9."
      sftplug export runs/default --out exported/
    """


@cli.command(context_settings=CONTEXT)
@model_options
@data_options
@optim_options
@lora_options
@runtime_options
@run_options
@user_errors
def train(**options):
    """Fine-tune a model (LoRA by default).

    With no options it fine-tunes the built-in tiny model on the bundled SFT data.

    \b
    Examples:
      sftplug train
      sftplug train --steps 500 --micro-bsz 4 --accum 4 --out runs/long
      sftplug train --full --dtype bf16 --attention flash --device cuda
      sftplug train --nproc 4 --full --strategy fsdp --dtype bf16
    """
    from sftplug.registry import build_registry
    from sftplug.train.loop import train as run_training

    nproc = options.pop("nproc")
    if nproc > 1:
        from sftplug.cli.launch import launch, train_args

        return launch(nproc, train_args(sys.argv))
    options["lora_targets"] = tuple(t.strip() for t in options["lora_targets"].split(",") if t.strip())
    for key in ("data", "eval_data"):
        if options[key] is None:
            options.pop(key)
    config = TrainConfig(**options)
    summary = run_training(config, build_registry(), echo=click.echo)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        click.echo(_summary_text(summary))


def _summary_text(s: dict) -> str:
    lines = [
        f"done: {s['steps']} updates in {s['seconds']:.1f}s ({s['tokens_per_second']:,.0f} tok/s)",
        f"checkpoint: {s['checkpoint']}",
    ]
    if s["eval_loss_before"] is not None:
        drop = 100 * (1 - s["eval_loss_after"] / s["eval_loss_before"])
        lines.append(f"held-out loss: {s['eval_loss_before']:.4f} -> {s['eval_loss_after']:.4f} ({drop:.0f}% lower)")
    if s.get("peak_memory_gib") is not None:
        lines.append(f"peak GPU memory: {s['peak_memory_gib']:.2f} GiB")
    if s["sample_prompt"]:
        lines += [
            f"sample prompt: {s['sample_prompt']}",
            f"  answer before: {s['answer_before']!r}",
            f"  answer after:  {s['answer_after']!r}",
        ]
    return "\n".join(lines)


@cli.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json):
    """List every plugin, its hooks, and why it is unavailable if it is."""
    from sftplug.registry import build_registry

    registry = build_registry()
    if as_json:
        click.echo(json.dumps([p.as_dict() for p in registry.plugins], indent=2))
        return
    for p in registry.plugins:
        status = "ok" if p.available else "unavailable"
        hooks = ", ".join(p.hooks) or "-"
        click.echo(f"{p.name:<20} {status:<12} {p.source:<16} {hooks}")
        if not p.available:
            click.echo(f"{'':<20} reason: {p.reason}")


@cli.command(context_settings=CONTEXT)
@click.argument("checkpoint")
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--device", default="auto", show_default=True)
@user_errors
def generate(checkpoint, prompt, max_new_tokens, device):
    """Answer PROMPT greedily with a trained CHECKPOINT (run folder or checkpoint folder).

    \b
    Example:
      sftplug generate runs/default "Count from 4 to 9."
    """
    from sftplug.model.generate import answer
    from sftplug.loading import load_model, resolve_device

    loaded = load_model(checkpoint, device=resolve_device(device))
    click.echo(answer(loaded.model, loaded.tokenizer, prompt, max_new_tokens))


@cli.command(context_settings=CONTEXT)
@click.argument("checkpoint")
@click.option("--out", "out_dir", required=True, help="New or empty folder to write.")
@click.option(
    "--merge/--adapter",
    default=True,
    show_default=True,
    help="LoRA runs: merge into the base weights, or write base/ + adapter/ for PEFT.",
)
@click.option("--dtype", type=click.Choice(dtypes.TRAINING), help="Weight dtype of the export (default: the base's).")
@user_errors
def export(checkpoint, out_dir, merge, dtype):
    """Write CHECKPOINT as an HF folder that transformers (and peft) load.

    \b
    Examples:
      sftplug export runs/default --out exported/            # merged, one HF folder
      sftplug export runs/default --out exported/ --adapter  # exported/base + exported/adapter
    """
    from sftplug.hf.export import export_checkpoint

    written = export_checkpoint(checkpoint, out_dir, merge=merge, dtype=dtype)
    for kind, path in written.items():
        click.echo(f"{kind}: {path}")


@bench.command("step", context_settings=CONTEXT)
@click.option(
    "--workload",
    type=click.Choice(["W0", "W1"]),
    default="W0",
    show_default=True,
    help="W0: CPU, fp32, 6 layers; W1: GPU, bf16, TinyLlama-1.1B shape (DESIGN.md).",
)
@click.option("--full", is_flag=True, help="Full fine-tuning instead of LoRA.")
@click.option("--rounds", type=int, default=2, show_default=True, help="Alternating rounds of both sides.")
@click.option("--steps", type=int, default=5, show_default=True, help="Timed updates per side and round.")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed updates first.")
@click.option("--attention", default="auto", show_default=True)
@click.option(
    "--variant",
    "variants",
    multiple=True,
    type=click.Choice(["compile", "workers2"]),
    help="Also time sftplug with --torch-compile or --workers 2 (repeatable).",
)
@click.option("--json", "as_json", is_flag=True)
@user_errors
def bench_step(workload, full, rounds, steps, warmup, attention, variants, as_json):
    """Time sftplug against HF transformers + PEFT on the same workload.

    Each side runs in its own process, in rounds that alternate the order; prints
    tokens/s, forward / backward / optimizer ms and peak memory for both, and the ratios.

    \b
    Examples:
      sftplug bench step --workload W0
      sftplug bench step --workload W1 --rounds 1 --json
      sftplug bench step --workload W1 --variant compile --variant workers2
    """
    from sftplug.diagnostics.step_bench import bench_step as run_bench, format_step_table

    result = run_bench(workload, rounds=rounds, steps=steps, warmup=warmup, full=full, attention=attention,
                       variants=variants)
    click.echo(json.dumps(result, indent=2) if as_json else format_step_table(result))


cli.add_command(doctor)
cli.add_command(bench)


def main():
    try:
        cli.main(prog_name="sftplug")
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
