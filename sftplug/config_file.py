"""Config files: ``sftplug train --config run.yaml`` (or ``.toml``), and the resolved config written back.

A file's keys are TrainConfig's field names (``micro_bsz``; ``micro-bsz`` works too) plus
``nproc``. :func:`read_config_file` checks each key and the type of its value;
:func:`load_config` then builds the TrainConfig, whose own checks stay the one place values
are judged, and names the file and key in their message. :func:`dump_config` writes the
YAML that :func:`load_config` reads back into an equal TrainConfig (OUT/config.yaml).
"""

from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import fields
from pathlib import Path

import yaml

from sftplug.config import TrainConfig, flag
from sftplug.errors import SftplugError, closest

# `nproc` is a flag of `sftplug train`, not a TrainConfig field: how many processes to start.
NPROC = "nproc"
KEYS = [f.name for f in fields(TrainConfig)] + [NPROC]
_HINTS = typing.get_type_hints(TrainConfig) | {NPROC: int}
# PyYAML reads `1e-4` (no dot) as a string; a number written that way is still a number.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def read_config_file(path: str | Path) -> dict:
    """The file's settings by field name (and ``nproc``), each of its field's type; one-line errors."""
    settings = {}
    for key, value in _parse(path).items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name not in KEYS:
            guess = closest(str(name), KEYS)
            hint = f"did you mean '{guess}'?" if guess else "the keys are the options of `sftplug train -h`"
            raise SftplugError(f"{path}: unknown key '{key}'; {hint}")
        if name in settings:
            raise SftplugError(f"{path}: key '{name}' is given twice (as {name} and {name.replace('_', '-')})")
        settings[name] = _convert(path, name, value)
    if settings.get(NPROC, 1) < 1:
        raise SftplugError(f"{path}, key 'nproc': must be at least 1, got {settings[NPROC]}")
    return settings


def load_config(path: str | Path, overrides: dict | None = None) -> tuple[TrainConfig, int | None]:
    """The TrainConfig of a config file with ``overrides`` (field -> value) winning, and the file's nproc."""
    settings = read_config_file(path)
    nproc = settings.pop(NPROC, None)
    overrides = overrides or {}
    from_file = {k: v for k, v in settings.items() if k not in overrides}
    try:
        return TrainConfig(**from_file, **overrides), nproc
    except SftplugError as exc:
        # TrainConfig's messages name the options they judge: name the file's keys among them
        keys = [k for k in from_file if re.search(re.escape(flag(k)) + r"(?![\w-])", str(exc))]
        if not keys:
            raise
        named = ", ".join(f"'{k}'" for k in keys)
        raise SftplugError(f"{path}, key{'s' if len(keys) > 1 else ''} {named}: {exc}") from None


def dump_config(config: TrainConfig, nproc: int | None = None) -> str:
    """The config as YAML, keys in TrainConfig's order; ``sftplug train --config`` reads it back."""
    settings = config.to_dict()
    if nproc is not None:
        settings[NPROC] = nproc
    header = "# sftplug train --config FILE repeats this run; flags given beside --config override it.\n"
    return header + yaml.safe_dump(settings, sort_keys=False, allow_unicode=True)


def comma_list(value) -> tuple[str, ...]:
    """A list-valued option: "qkv, o" or ["qkv", "o"] -> ("qkv", "o")."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(t.strip() for t in items if t.strip())


def _parse(path: str | Path) -> dict:
    """The file's top-level mapping (TOML for .toml, else YAML, which includes JSON)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SftplugError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise SftplugError(f"{path}: is a folder; --config takes a YAML or TOML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SftplugError(f"{path}: cannot read the config file ({getattr(exc, 'strerror', None) or exc})") from None
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:
            raise SftplugError(f"{path}: TOML config files need Python 3.11 or newer; use a YAML file") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SftplugError(f"{path}: not valid TOML: {exc}") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SftplugError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:  # an empty file: no settings
        return {}
    if not isinstance(data, dict):
        raise SftplugError(f"{path}: expected a mapping of option names to values at the top, got a "
                           f"{type(data).__name__}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + " ".join(problem.split())


def _convert(path, name: str, value):
    """``value`` as field ``name`` takes it, or a one-line error naming the expected type."""
    hint = _HINTS[name]
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    optional = type(None) in kinds
    kind = typing.get_origin(kinds[0]) or kinds[0]
    if value is None and optional:
        return None
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
    if kind is str and isinstance(value, str):
        return value
    if kind is tuple and (isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return comma_list(value)
    if kind is dict and isinstance(value, (dict, str)):
        return value  # its pairs are checked by TrainConfig (parse_field_map)
    expected = _EXPECTED.get(kind, kind.__name__) + (" or null" if optional else "")
    raise SftplugError(f"{path}, key '{name}': expected {expected}, got {json.dumps(value, default=str)}")


_EXPECTED = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    tuple: "a list of names or a comma-separated string",
    dict: "a mapping or FIELD=NAME pairs separated by commas",
}
