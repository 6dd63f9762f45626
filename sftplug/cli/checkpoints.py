"""Commands on a trained checkpoint: ``sftplug generate`` and ``sftplug export``."""

from __future__ import annotations

import click

from sftplug import dtypes
from sftplug.cli.options import CONTEXT, user_errors


@click.command(context_settings=CONTEXT, short_help="Answer a prompt with a trained checkpoint (greedy).")
@click.argument("checkpoint")
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, default=64, show_default=True,
              help="Most tokens to generate; it stops earlier at the end-of-sequence token.")
@click.option("--device", default="auto", show_default=True,
              help="auto (the GPU if there is one), cpu, cuda or cuda:N.")
@user_errors
def generate(checkpoint, prompt, max_new_tokens, device):
    """Answer PROMPT greedily with a trained CHECKPOINT (run folder or checkpoint folder).

    \b
    Example:
      sftplug generate runs/default "Count from 4 to 9."
    """
    from sftplug.loading import load_model
    from sftplug.model.generate import answer
    from sftplug.probes import resolve_device

    loaded = load_model(checkpoint, device=resolve_device(device))
    click.echo(answer(loaded.model, loaded.tokenizer, prompt, max_new_tokens))


@click.command(context_settings=CONTEXT, short_help="Write a checkpoint as an HF folder (or base + adapter).")
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
    from sftplug.checkpoint.export import export_checkpoint

    written = export_checkpoint(checkpoint, out_dir, merge=merge, dtype=dtype)
    for kind, path in written.items():
        click.echo(f"{kind}: {path}")
