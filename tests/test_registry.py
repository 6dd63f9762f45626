import json

import pytest

import sftplug
from sftplug.attention import AttentionBackend, AttentionRequest
from sftplug.attention.choice import choose_backend
from sftplug.errors import SftplugError
from sftplug.registry import Registry, build_registry


class Doubling(AttentionBackend):
    name = "doubling"
    priority = 99

    @sftplug.hookimpl
    def select_attention(self, request):
        return self


class Unavailable:
    def why_unavailable(self):
        return "needs a quantum computer"

    @sftplug.hookimpl
    def select_attention(self, request):
        raise AssertionError("a skipped plugin must never be called")


class Misspelt:
    @sftplug.hookimpl
    def selct_attention(self, request):
        return None


def request(name="auto"):
    import torch

    return AttentionRequest(name, torch.device("cpu"), torch.float32, 16, 4, 2)


def test_builtin_plugins_register_or_say_why_not():
    registry = build_registry(entrypoints=False)
    by_name = {p.name: p for p in registry.plugins}
    assert {"flash", "efficient", "cudnn", "math", "triton", "precision", "resume"} <= set(by_name)
    for p in registry.plugins:
        assert not p.why_unavailable.startswith("failed to load"), p
        assert not p.why_unavailable.startswith("invalid hook"), p
        assert p.available or p.why_unavailable
    assert by_name["math"].available and by_name["math"].hooks == ["select_attention"]
    assert "configure_precision" in by_name["precision"].hooks


def test_plugin_registered_in_a_test_wins_auto():
    registry = Registry()
    registry.add("doubling", lambda: Doubling)
    choice = choose_backend(registry.hook, request())
    assert choice.backend.name == "doubling"
    assert "auto" in choice.why_chosen


def test_unavailable_plugin_is_skipped_saying_why():
    registry = Registry()
    info = registry.add("quantum", lambda: Unavailable())
    assert not info.available
    assert info.why_unavailable == "needs a quantum computer"
    assert registry.skipped() == [info]
    with pytest.raises(SftplugError, match="quantum.*unavailable: needs a quantum computer"):
        choose_backend(registry.hook, request("quantum"), {"quantum": info.why_unavailable})


def test_plugin_that_raises_on_load_is_reported_not_fatal():
    registry = Registry()

    def broken():
        raise ImportError("No module named 'missing_dependency'")

    info = registry.add("broken", broken, source="broken-pkg 1.0")
    assert not info.available
    assert "failed to load: ImportError" in info.why_unavailable
    assert registry.add("doubling", lambda: Doubling).available


def test_misspelt_hook_is_caught_and_unregistered():
    registry = Registry()
    info = registry.add("misspelt", lambda: Misspelt())
    assert not info.available
    assert "selct_attention" in info.why_unavailable
    assert registry.pm.get_plugin("misspelt") is None


def test_disable_plugins_by_environment(monkeypatch):
    monkeypatch.setenv("SFTPLUG_DISABLE_PLUGINS", "math, flash")
    registry = build_registry(entrypoints=False)
    assert registry.info("math").why_unavailable == "disabled by SFTPLUG_DISABLE_PLUGINS"
    assert not registry.info("flash").available
    assert registry.info("precision").available


class _FakeDist:
    name, version = "fake-dist", "0.1"


class _FakeEntryPoint:
    def __init__(self, name, load):
        self.name, self.value, self.dist, self._load = name, f"{name}:plugin", _FakeDist(), load

    def load(self):
        return self._load()


def test_entry_points_go_through_the_same_path(monkeypatch):
    def raising():
        raise RuntimeError("boom")

    eps = [_FakeEntryPoint("doubling", lambda: Doubling), _FakeEntryPoint("exploding", raising)]
    monkeypatch.setattr("sftplug.registry.entry_points", lambda group: eps if group == "sftplug" else [])
    registry = build_registry()
    assert registry.info("doubling").available and registry.info("doubling").source == "fake-dist 0.1"
    assert "failed to load: RuntimeError: boom" in registry.info("exploding").why_unavailable
    monkeypatch.setenv("SFTPLUG_NO_ENTRYPOINTS", "1")
    assert build_registry().info("doubling") is None


def test_plugins_cli_survives_a_broken_entry_point(monkeypatch):
    from click.testing import CliRunner

    from sftplug.cli import cli

    def raising():
        raise RuntimeError("boom")

    monkeypatch.setattr("sftplug.registry.entry_points", lambda group: [_FakeEntryPoint("exploding", raising)])
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    listed = {p["name"]: p for p in json.loads(result.output)}
    assert listed["exploding"]["available"] is False
    assert "boom" in listed["exploding"]["reason"]
    assert listed["math"]["available"] is True


def test_a_second_plugin_of_the_same_name_is_skipped_not_fatal():
    registry = Registry()
    assert registry.add("doubling", lambda: Doubling).available
    again = registry.add("doubling", lambda: Doubling)
    assert not again.available and "not registered" in again.why_unavailable


@pytest.mark.parametrize("essential", ["precision", "resume"])
def test_an_essential_builtin_cannot_be_disabled_into_a_crash(monkeypatch, essential):
    from click.testing import CliRunner

    from sftplug.cli import cli

    monkeypatch.setenv("SFTPLUG_DISABLE_PLUGINS", f"flash,{essential}")
    with pytest.raises(SftplugError, match=f"'{essential}' cannot be disabled: it "):
        build_registry(entrypoints=False)
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error:")] == [
        f"Error: SFTPLUG_DISABLE_PLUGINS=flash,{essential}: '{essential}' cannot be disabled: "
        + ("it sets the run's precision (autocast, the fp16 loss scaler, TF32); " if essential == "precision" else
           "it saves and restores the step, data position, optimizer, schedule and RNG; ")
        + "remove it from the list (a plugin of your own takes precedence without that)"
    ]
