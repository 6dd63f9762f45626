"""Chat templates: the built-in ones, where transformers keeps a model's, and how they compile.

A model folder's templates are read wherever transformers keeps them
(:func:`model_templates`); ``--chat-template NAME|FILE|FOLDER`` names one instead
(:func:`resolve_chat_template`). Templates compile in HF's sandboxed Jinja environment.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from sftplug.errors import SftplugError

# Built-in chat templates, by name. "sftplug" is the fallback for models without one: it
# ends every assistant turn with the model's own EOS token, so generation learns to stop.
BUILTIN_TEMPLATES = {
    "sftplug": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
        "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    # ChatML as Qwen and others use it; the turn ends with <|im_end|>, which should be the
    # model's EOS token for generation to stop.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}
DEFAULT_TEMPLATE = "sftplug"

# Where transformers keeps a tokenizer's chat templates (the names in transformers.utils.hub).
TEMPLATE_FILE = "chat_template.jinja"  # the template named "default"
NAMED_TEMPLATES_DIR = "additional_chat_templates"  # NAME.jinja
CONFIG_FILE = "tokenizer_config.json"  # its "chat_template": a string, or a list of {name, template}
PROCESSOR_TEMPLATE_FILE = "chat_template.json"  # a processor's legacy file: {"chat_template": ...}


class ChatTemplateError(SftplugError):
    """The chat template refused or could not render one conversation."""


def resolve_chat_template(value: str | None) -> str | None:
    """The template ``--chat-template`` names: a built-in name, a file, a model folder, or None.

    value: None (use the model's own template), a built-in name (see BUILTIN_TEMPLATES),
    a Jinja file, a JSON file with a ``chat_template`` (tokenizer_config.json,
    chat_template.json), a model folder (its default template, :func:`model_templates`), or an
    inline template (a string containing ``{{`` or ``{%``).
    """
    resolved = resolve_with_source(value)
    return None if resolved is None else resolved[0]


def resolve_with_source(value: str | None) -> tuple[str, str] | None:
    """(template, where it came from) for a ``--chat-template`` value; None for none."""
    if value is None or value == "":
        return None
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value], f"built-in '{value}'"
    if "{{" in value or "{%" in value:
        return value, "--chat-template (inline)"
    path = Path(value).expanduser()
    if path.is_dir():
        default = model_templates(path, read_tokenizer_config(path)).get("default")
        if default is None:
            raise SftplugError(f"--chat-template {value}: the folder has no default chat template "
                               f"({TEMPLATE_FILE}, {CONFIG_FILE} or {PROCESSOR_TEMPLATE_FILE})")
        return default[0], f"--chat-template {value} ({default[1]})"
    if not path.is_file():
        raise SftplugError(
            f"--chat-template {value}: no such file and not a built-in template "
            f"(built-ins: {', '.join(BUILTIN_TEMPLATES)})"
        )
    if path.suffix == ".json":
        try:
            own = _read_json(path).get("chat_template")
        except AttributeError:  # JSON, but not an object
            own = None
        default = _config_templates(own, str(path)).get("default") if own else None
        if default is None:
            raise SftplugError(f"--chat-template {value}: the JSON file has no chat_template (or none named 'default')")
        return default[0], f"--chat-template {value}"
    text = _read_text(path, f"--chat-template {value}")
    if not text.strip():
        raise SftplugError(f"--chat-template {value}: the file is empty")
    return text, f"--chat-template {value}"


def model_templates(folder: Path, config: dict) -> dict[str, tuple[str, str]]:
    """A model folder's chat templates by name, each (template, the file it came from), as transformers reads them.

    ``AutoTokenizer.from_pretrained``'s precedence: chat_template.jinja (named "default") and
    additional_chat_templates/NAME.jinja, when either exists, replace tokenizer_config.json's
    ``chat_template`` (a string, which is "default", or a list of {name, template}). The
    processor's legacy chat_template.json, which AutoTokenizer does not read, counts only where
    the tokenizer has no template. ``apply_chat_template`` renders the one named "default".
    """
    files = {}
    if (folder / TEMPLATE_FILE).is_file():
        files["default"] = folder / TEMPLATE_FILE
    if (folder / NAMED_TEMPLATES_DIR).is_dir():
        files.update({path.name.removesuffix(".jinja"): path
                      for path in sorted((folder / NAMED_TEMPLATES_DIR).glob("*.jinja"))})
    if files:
        return {name: (_read_text(path, str(path)), path.relative_to(folder).as_posix())
                for name, path in files.items()}
    if config.get("chat_template"):
        return _config_templates(config["chat_template"], CONFIG_FILE, folder / CONFIG_FILE)
    legacy = folder / PROCESSOR_TEMPLATE_FILE
    if legacy.is_file():
        own = _read_json(legacy)
        if isinstance(own, dict) and own.get("chat_template"):
            return _config_templates(own["chat_template"], PROCESSOR_TEMPLATE_FILE, legacy)
    return {}


def _config_templates(value, source: str, path=None) -> dict[str, tuple[str, str]]:
    """A JSON ``chat_template`` value (a string, or HF's list of {name, template}) by name."""
    if isinstance(value, str):
        return {"default": (value, source)}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: (t["template"], f"{source} (named '{t['name']}')") for t in value}
    raise SftplugError(f"{path or source}: chat_template must be a string or a list of {{name, template}} objects")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SftplugError(f"{what}: cannot be read ({exc})") from None


def read_tokenizer_config(folder: Path) -> dict:
    """A model folder's tokenizer_config.json ({} where there is none)."""
    config = _read_json(folder / CONFIG_FILE)
    if not isinstance(config, dict):
        raise SftplugError(f"{folder / CONFIG_FILE}: not a JSON object")
    return config


def _read_json(path: Path):
    """A JSON file's content; {} for a file that is not there."""
    if not path.is_file():
        return {}
    try:
        return json.loads(_read_text(path, str(path)))
    except json.JSONDecodeError as exc:
        raise SftplugError(f"{path}: not valid JSON ({exc})") from None


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """A template compiled in HF's sandbox (loopcontrols, tojson, raise_exception, generation tags)."""
    from datetime import datetime

    from jinja2 import nodes
    from jinja2.exceptions import TemplateError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTags(Extension):
        # HF's {% generation %} ... {% endgeneration %} marks assistant text; sftplug finds
        # assistant text by rendering, so the block renders its body unchanged.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTags, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise SftplugError(f"the chat template does not compile: {exc}") from None
