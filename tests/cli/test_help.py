"""Help a user can read: every option described, every default shown whole, no document the user lacks.

The command tree is walked from the click group, so a command or option added later is checked too.
"""

import re
from pathlib import Path

import click
import pytest

from sftplug.cli import cli

ROOT = Path(__file__).resolve().parents[2]
WIDTH = 80  # a common terminal; click wraps every help text to it


def walk(command=cli, parent=None, name="sftplug"):
    """(help context, command) for the group and every command and subcommand below it."""
    ctx = click.Context(command, info_name=name, parent=parent, terminal_width=WIDTH, **command.context_settings)
    yield ctx, command
    for sub_name, sub in getattr(command, "commands", {}).items():
        yield from walk(sub, ctx, sub_name)


COMMANDS = list(walk())
PATHS = [ctx.command_path for ctx, _ in COMMANDS]


def flat_help(ctx, command) -> str:
    """The rendered help with its line breaks and indents as single spaces."""
    return " ".join(command.get_help(ctx).split())


def has_default(ctx, option: click.Option) -> bool:
    if option.is_flag and not option.secondary_opts:  # --x alone: off unless given
        return False
    # no default: None, nothing (multiple, an empty comma list), or click 8.3's UNSET
    return option.get_default(ctx, call=False) not in (None, (), "", getattr(click.core, "UNSET", None))


def test_the_walk_reaches_every_command():
    assert {
        "sftplug", "sftplug train", "sftplug data", "sftplug data preview", "sftplug generate", "sftplug export",
        "sftplug plugins", "sftplug doctor", "sftplug plot", "sftplug bench", "sftplug bench attention",
        "sftplug bench ops", "sftplug bench step",
    } <= set(PATHS)  # fmt: skip


@pytest.mark.parametrize("ctx, command", COMMANDS, ids=PATHS)
def test_every_option_and_argument_is_described(ctx, command):
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            assert (param.help or "").strip(), f"{ctx.command_path} {param.opts[0]} has no help"
        else:  # arguments are described in the command's own text
            assert param.human_readable_name in command.help, f"{ctx.command_path} {param.human_readable_name}"


@pytest.mark.parametrize("ctx, command", COMMANDS, ids=PATHS)
def test_a_group_lists_its_commands_without_cutting_their_summaries(ctx, command):
    listing = command.get_help(ctx).partition("\nCommands:\n")[2]  # click cuts a long summary with "..."
    assert [line for line in listing.splitlines() if line.rstrip().endswith("...")] == []

@pytest.mark.parametrize("ctx, command", COMMANDS, ids=PATHS)
def test_every_default_is_shown_whole(ctx, command):
    text = flat_help(ctx, command)
    for param in command.get_params(ctx):
        if isinstance(param, click.Option) and has_default(ctx, param):
            shown = param.get_help_extra(ctx).get("default")
            assert shown, f"{ctx.command_path} {param.opts[0]} does not show its default"
            # a default click had to break inside a word reads as "q_proj,k_ proj" here
            assert f"default: {shown}" in text, f"{ctx.command_path} {param.opts[0]}: default broken in the help"


def test_the_lora_targets_default_is_the_value_train_uses():
    from sftplug.config import DEFAULT_LORA_TARGETS
    from sftplug.config_file import comma_list

    ctx, train = next((c, cmd) for c, cmd in COMMANDS if c.command_path == "sftplug train")
    option = next(p for p in train.params if p.name == "lora_targets")
    assert comma_list(option.get_help_extra(ctx)["default"]) == DEFAULT_LORA_TARGETS


@pytest.mark.parametrize("ctx, command", COMMANDS, ids=PATHS)
def test_help_names_only_documents_the_repository_has(ctx, command):
    text = command.get_help(ctx)
    assert "DESIGN" not in text
    for document in re.findall(r"[\w-]+\.md\b", text):
        assert (ROOT / document).is_file(), f"{ctx.command_path} names {document}"


def test_the_attention_shapes_are_written_where_the_help_says():
    from sftplug.diagnostics import attention_bench as bench

    ctx, command = next((c, cmd) for c, cmd in COMMANDS if c.command_path == "sftplug bench attention")
    help_text = flat_help(ctx, command).replace(" ", "")
    benchmarks = " ".join((ROOT / "BENCHMARKS.md").read_text().split())
    for shape in [*bench.CUDA_SHAPES, *bench.CPU_SHAPES, bench.CUDA_PACKED, bench.CPU_PACKED]:
        assert str(shape).replace(" ", "") in help_text, shape
        assert str(shape) in benchmarks, shape
