"""``sftplug train``: its options are TrainConfig's fields, generated (sftplug.cli.options)."""

from __future__ import annotations

import os
import sys

import click

from sftplug.cli.options import CONTEXT, GroupedCommand, config_from_options, config_options, given_options, user_errors


@click.command(cls=GroupedCommand, context_settings=CONTEXT)
@config_options
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Start N local processes (torchrun --standalone); see --strategy.",
)
@click.option("--config", "config_file", metavar="FILE",
              help="Read the options from a YAML or TOML file (keys: the option names); flags given here win.")
@click.option("--print-config", is_flag=True, help="Print the resolved configuration as YAML and exit.")
@user_errors
def train(nproc, config_file, print_config, **options):
    """Fine-tune a model (LoRA by default).

    With no options it fine-tunes the built-in tiny model on the bundled SFT data.

    \b
    Examples:
      sftplug train
      sftplug train --config examples/lora-hf-llama.yaml --steps 50
      sftplug train --config runs/default/config.yaml --out runs/again   (repeat a run)
      sftplug train --steps 500 --micro-bsz 4 --accum 4 --out runs/long
      sftplug train --full --dtype bf16 --attention flash --device cuda
      sftplug train --nproc 4 --full --strategy fsdp --dtype bf16
      sftplug train --model ./Llama-3.1-8B --quantize nf4 --grad-ckpt --offload-activations   (QLoRA)
    """
    from sftplug.config_file import dump_config
    from sftplug.registry import build_registry
    from sftplug.train.loop import interrupted_exit_code
    from sftplug.train.loop import train as run_training

    given = given_options(click.get_current_context())
    config, file_nproc = config_from_options(options, config_file, given)
    # Under torchrun the processes exist already: a file's nproc (a run's config.yaml) starts no more.
    if file_nproc is not None and "nproc" not in given and "WORLD_SIZE" not in os.environ:
        nproc = file_nproc
    if print_config:
        return click.echo(dump_config(config, nproc), nl=False)
    if nproc > 1:
        from sftplug.cli.launch import launch, train_args

        return launch(nproc, train_args(sys.argv))
    summary = run_training(config, build_registry(), echo=click.echo)
    if summary["interrupted"]:  # saved, and said how to resume; no summary lines, no plot
        raise SystemExit(interrupted_exit_code(summary))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        from sftplug.diagnostics.plot import plot_after_run

        click.echo(summary_text(summary))
        if plot_line := plot_after_run(summary["out"]):
            click.echo(plot_line)


def summary_text(s: dict) -> str:
    """The lines a finished run ends with."""
    lines = [
        f"done: {s['steps']} updates in {s['seconds']:.1f}s ({s['tokens_per_second']:,.0f} tok/s)",
        f"checkpoint: {s['checkpoint']}",
    ]
    if s["eval_loss_before"] is not None:
        drop = 100 * (1 - s["eval_loss_after"] / s["eval_loss_before"])
        lines.append(f"held-out loss: {s['eval_loss_before']:.4f} -> {s['eval_loss_after']:.4f} ({drop:.0f}% lower)")
    if s.get("peak_memory_gib") is not None:
        lines.append(f"peak GPU memory of the training steps: {s['peak_memory_gib']:.2f} GiB")
    if s["sample_prompt"]:
        lines += [
            f"sample prompt: {s['sample_prompt']}",
            f"  answer before: {s['answer_before']!r}",
            f"  answer after:  {s['answer_after']!r}",
        ]
    return "\n".join(lines)
