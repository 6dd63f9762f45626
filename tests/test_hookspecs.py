"""The hook contract: typed, and listed in the order a run calls it."""

import ast
import inspect
import typing
from pathlib import Path

import sftplug
from sftplug import hookspecs
from sftplug.registry import build_registry
from sftplug.train.loop import train

SPECS = [name for name, fn in vars(hookspecs).items() if hasattr(fn, "sftplug_spec")]


def type_checking_names() -> dict:
    """The names hookspecs.py imports under TYPE_CHECKING, imported for real."""
    tree = ast.parse(Path(hookspecs.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    names = dict(vars(hookspecs))
    exec(compile(ast.Module(body=block.body, type_ignores=[]), "hookspecs", "exec"), names)
    return names


def test_every_hook_parameter_and_return_is_annotated_with_real_classes():
    names = type_checking_names()
    assert len(SPECS) == 8
    for name in SPECS:
        fn = getattr(hookspecs, name)
        hints = typing.get_type_hints(fn, globalns=names)  # fails on a name that does not exist
        assert set(hints) == {*inspect.signature(fn).parameters, "return"}, name


class Recorder:
    """Implements every hook, returns nothing (a logger of its own name), and records each call."""

    def __init__(self):
        self.calls = []

    def seen(self, hook):
        self.calls.append(hook)

    @sftplug.hookimpl
    def configure_precision(self):
        self.seen("configure_precision")

    @sftplug.hookimpl
    def load_state(self):
        self.seen("load_state")

    @sftplug.hookimpl
    def select_attention(self):
        self.seen("select_attention")

    @sftplug.hookimpl
    def select_linear_attention(self):
        self.seen("select_linear_attention")

    @sftplug.hookimpl
    def select_fused_ops(self):
        self.seen("select_fused_ops")

    @sftplug.hookimpl
    def open_logger(self, name):
        self.seen("open_logger")
        return Log() if name == "recorder" else None

    @sftplug.hookimpl
    def resume_state(self):
        self.seen("resume_state")

    @sftplug.hookimpl
    def on_resume(self):
        self.seen("on_resume")


class Log:
    def log(self, record):
        pass

    def close(self):
        pass


def run_recorded(config, quiet) -> list[str]:
    """The hooks in the order of their first call once the model is loaded, after precision."""
    recorder = Recorder()
    registry = build_registry(entrypoints=False)
    registry.add("recorder", lambda: recorder)
    train(config, registry, echo=quiet)
    calls = recorder.calls
    # before loading, the kernel hooks may only be asked whether the run's choices can work here
    before = calls[: calls.index("load_state")]
    assert before[0] == "configure_precision" and set(before[1:]) <= {"select_attention", "select_fused_ops"}
    after = calls[calls.index("load_state"):]
    return ["configure_precision"] + sorted(set(after), key=after.index)


def test_hooks_are_listed_in_the_order_a_run_calls_them(small_config, quiet):
    # the tiny model has no linear-attention layers: select_linear_attention is asked for hybrid models only
    specs = [name for name in SPECS if name != "select_linear_attention"]
    fresh = run_recorded(small_config(steps=2, save_every=1, log_to=["recorder"]), quiet)
    assert fresh == [name for name in specs if name != "on_resume"]
    resumed = run_recorded(small_config(steps=3, save_every=1, log_to=["recorder"], resume="auto"), quiet)
    assert resumed == specs[:-2] + ["on_resume", "resume_state"]  # restored before the next checkpoint
