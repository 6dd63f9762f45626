"""Find plugins, check they can run here, register them: built-ins and entry points alike.

A plugin is a module or an object with ``@hookimpl`` functions. It may define
``why_unavailable() -> str | None``; a non-None answer keeps it out of the plugin
manager and in the skipped list, saying why (pytest's skipped-plugin pattern).

Environment:
  SFTPLUG_DISABLE_PLUGINS   comma-separated plugin names to skip (not the ESSENTIAL ones)
  SFTPLUG_NO_ENTRYPOINTS=1  load built-ins only, no third-party entry points
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import pluggy

from sftplug import hookspecs
from sftplug.deprecated import renamed_attribute
from sftplug.errors import SftplugError
from sftplug.hookspecs import PROJECT

ENTRY_POINT_GROUP = "sftplug"
# Built-ins a run cannot do without: what each one does. A plugin of your own that
# implements the same hooks takes precedence over them without disabling them.
ESSENTIAL = {
    "precision": "it sets the run's precision (autocast, the fp16 loss scaler, TF32)",
    "resume": "it saves and restores the step, data position, optimizer, schedule and RNG",
}


@dataclass
class PluginInfo:
    name: str
    source: str  # "builtin" or the distribution that provides it
    hooks: list[str] = field(default_factory=list)
    available: bool = True
    why_unavailable: str = ""  # why it is not available, or why it failed to load

    reason = renamed_attribute("reason", "why_unavailable")

    def as_dict(self) -> dict:
        """What ``sftplug plugins --json`` writes (its key "reason" kept for the scripts that read it)."""
        return {
            "name": self.name,
            "source": self.source,
            "hooks": self.hooks,
            "available": self.available,
            "reason": self.why_unavailable,
        }


class Registry:
    """A pluggy PluginManager plus what happened to every plugin it was offered."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self.disabled = {n.strip() for n in os.environ.get("SFTPLUG_DISABLE_PLUGINS", "").split(",") if n.strip()}
        essential = sorted(self.disabled & set(ESSENTIAL))
        if essential:
            name = essential[0]
            raise SftplugError(
                f"SFTPLUG_DISABLE_PLUGINS={os.environ['SFTPLUG_DISABLE_PLUGINS']}: '{name}' cannot be disabled: "
                f"{ESSENTIAL[name]}; remove it from the list (a plugin of your own takes precedence without that)"
            )

    @property
    def hook(self):
        return self.pm.hook

    def add(self, name: str, load, source: str = "builtin") -> PluginInfo:
        """Load a plugin through ``load()``, check it, and register it if it can run."""
        info = PluginInfo(name=name, source=source)
        self.plugins.append(info)
        if name in self.disabled:
            return _skip(info, "disabled by SFTPLUG_DISABLE_PLUGINS")
        try:
            plugin = load()
            if isinstance(plugin, type):
                plugin = plugin()
        except Exception as exc:  # one broken plugin must not break the CLI
            return _skip(info, f"failed to load: {type(exc).__name__}: {exc}")
        info.hooks = _hook_names(self.pm, plugin)
        try:
            why_unavailable = plugin.why_unavailable() if hasattr(plugin, "why_unavailable") else None
        except Exception as exc:
            why_unavailable = f"availability check raised {type(exc).__name__}: {exc}"
        if why_unavailable:
            return _skip(info, why_unavailable)
        try:
            self.pm.register(plugin, name=name)
        except ValueError as exc:  # the same name or object twice (e.g. two entry points)
            return _skip(info, f"not registered: {exc}")
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(plugin)
            return _skip(info, f"invalid hook implementation: {exc}")
        return info

    def available(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.available]

    def skipped(self) -> list[PluginInfo]:
        return [p for p in self.plugins if not p.available]

    def info(self, name: str) -> PluginInfo | None:
        return next((p for p in self.plugins if p.name == name), None)


def _skip(info: PluginInfo, why_unavailable: str) -> PluginInfo:
    info.available = False
    info.why_unavailable = why_unavailable
    return info


def _hook_names(pm: pluggy.PluginManager, plugin) -> list[str]:
    names = []
    for attr in dir(plugin):
        if pm.parse_hookimpl_opts(plugin, attr) is not None:
            names.append(attr)
    return sorted(names)


def _builtin_loader(module: str, attr: str):
    return lambda: getattr(importlib.import_module(module), attr)


def build_registry(entrypoints: bool | None = None) -> Registry:
    """The registry with every built-in plugin and, unless disabled, every entry point."""
    from sftplug.plugins.builtin import BUILTIN_PLUGINS

    registry = Registry()
    for name, target in BUILTIN_PLUGINS:
        module, attr = target.split(":")
        registry.add(name, _builtin_loader(module, attr))
    if entrypoints is None:
        entrypoints = os.environ.get("SFTPLUG_NO_ENTRYPOINTS", "") not in ("1", "true", "yes")
    if entrypoints:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            source = f"{dist.name} {dist.version}" if dist else ep.value
            registry.add(ep.name, ep.load, source=source)
    return registry
