"""The sftplug command line: one click group; each command lives in the module of its job."""

from __future__ import annotations

import sys

import click

from sftplug import __version__
from sftplug.cli.checkpoints import export, generate
from sftplug.cli.data import data
from sftplug.cli.diagnostics import bench, doctor, plot, plugins
from sftplug.cli.options import CONTEXT
from sftplug.cli.train import train


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", "-V", prog_name="sftplug")
def cli():
    """sftplug: supervised fine-tuning for Llama-family models, built from plugins.

    \b
    Examples:
      sftplug train                          # the built-in demo run on the CPU
      sftplug train --attention efficient --dtype bf16 --model ./Llama-3.2-1B --data chat.jsonl
      sftplug data preview --data chat.jsonl --model ./Llama-3.2-1B
      sftplug plugins --json
      sftplug generate runs/default "Count from 4 to 9."
      sftplug export runs/default --out exported/
      sftplug plot runs/default
    """


for command in (train, data, generate, export, plugins, doctor, bench, plot):
    cli.add_command(command)


def main():
    try:
        cli.main(prog_name="sftplug")
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
