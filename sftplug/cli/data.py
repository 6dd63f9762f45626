"""``sftplug data preview``: records as training sees them, and the dataset's statistics.

Its options are ``sftplug train``'s data options and ``--model``, generated from the same
TrainConfig fields, so they are spelt, documented and checked the same way.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from sftplug.cli.options import CONTEXT, GroupedCommand, config_option, user_errors
from sftplug.config import TrainConfig
from sftplug.errors import SftplugError

FIELDS = [f for f in dataclasses.fields(TrainConfig) if f.name == "model" or f.metadata["group"] == "data"]


def data_options(fn):
    for f in reversed(FIELDS):
        fn = config_option(f)(fn)
    return fn


@click.group(context_settings=CONTEXT)
def data():
    """Look at training data before training on it."""


@data.command(cls=GroupedCommand, context_settings=CONTEXT, short_help="Show records with their trained tokens marked.")
@data_options
@click.option("-n", "--records", "n", type=click.IntRange(min=0), default=3, show_default=True,
              help="Records to render token by token.")
@click.option("--color/--no-color", default=None,
              help="Trained tokens in green, or between \u27e6 and \u27e7 (default: colour on a terminal).")
@user_errors
def preview(n, color, **options):
    """Render the first records with their trained tokens marked, then the dataset's statistics.

    Only --model's tokenizer is loaded, never its weights. A marked token is one whose
    label the loss counts; without colour, trained text is written between \u27e6 and \u27e7.

    \b
    Examples:
      sftplug data preview --data chat.jsonl --model ./Llama-3.2-1B
      sftplug data preview --data train.parquet --field-map question=prompt,answer=completion -n 1
    """
    from sftplug.data.prepare import prepare_data
    from sftplug.data.preview import heading, preview_documents, render, stats_lines

    config = TrainConfig(**options)
    tokenizer = load_tokenizer(config.model)
    tokenizer.set_chat_template(config.chat_template)
    if color is None:
        color = sys.stdout.isatty()
    style = (lambda text: click.style(text, fg="green")) if color else None
    click.echo(f"model: {config.model}; chat template: {tokenizer.template_source}")
    docs = preview_documents(
        tokenizer, config.data, n, seq_len=config.seq_len, fmt=config.format, train_on_prompt=config.train_on_prompt,
        train_turns=config.train_turns, overlong=config.overlong, skip_bad_records=config.skip_bad_records,
        field_map=config.field_map,
    )  # fmt: skip
    for doc in docs:
        click.echo(heading(doc, config.data))
        click.echo(render(doc, style), color=color)
    prepared = prepare_data(
        tokenizer, data=config.data, eval_data=config.eval_data, eval_split=config.eval_split,
        seq_len=config.seq_len, pack=config.pack, fmt=config.format, train_on_prompt=config.train_on_prompt,
        overlong=config.overlong, skip_bad_records=config.skip_bad_records, seed=config.seed,
        field_map=config.field_map, train_turns=config.train_turns,
    )  # fmt: skip
    click.echo("--- statistics")
    for line in stats_lines(prepared):
        click.echo(line)


def load_tokenizer(model: str):
    """``--model``'s tokenizer without its weights, found as the built-in loaders find it.

    A preset uses the bundled tokenizer; an HF folder its tokenizer.json; an sftplug
    checkpoint its base model's, with the chat template the run trained with.
    """
    from sftplug.checkpoint import folders
    from sftplug.config import ASSETS
    from sftplug.data.tokenizer import Tokenizer
    from sftplug.model.transformer import PRESETS

    if model in PRESETS:
        return Tokenizer(ASSETS)
    if folders.is_checkpoint(model):
        manifest = folders.verify(folders.resolve(model))
        tokenizer = load_tokenizer(manifest["base_model"])
        tokenizer.set_chat_template(manifest.get("config", {}).get("chat_template"))
        return tokenizer
    if Path(model).is_dir():
        return Tokenizer(model)
    raise SftplugError(f"--model {model}: not a preset ({', '.join(PRESETS)}), a model folder or an sftplug checkpoint")
