"""A model folder's tokenizer: tokenizer.json, its special tokens and chat template.

The chat template is rendered in a sandboxed Jinja environment. Which characters an
assistant wrote is known while rendering (each turn's text is the difference between
the conversation rendered up to it and the prompt before it), so the loss mask never
depends on searching for marker tokens afterwards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sftplug.errors import SftplugError


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


@dataclass
class Segment:
    text: str
    trained: bool


class Tokenizer:
    def __init__(self, folder: str | Path, chat_template: str | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise SftplugError(f"{folder}: no tokenizer.json; sftplug needs a fast tokenizer file in the model folder")
        try:
            self.backend = HFTokenizer.from_file(str(path))
        except Exception as exc:
            raise SftplugError(f"{path}: cannot be read as a tokenizer ({exc})") from None
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.folder = folder
        self.config = config
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token")) or self.eos_token
        self.chat_template = chat_template or config.get("chat_template")
        if isinstance(self.chat_template, list):  # HF allows named templates
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()))
        self.eos_id = self.token_id(self.eos_token)
        self.bos_id = self.token_id(self.bos_token)
        self.pad_id = self.token_id(self.pad_token)
        if self.pad_id is None:
            self.pad_id = 0
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]):
        """Encodings (ids and character offsets) for many texts at once."""
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not self.chat_template:
            raise SftplugError(
                f"{self.folder}: the tokenizer has no chat_template; pass --chat-template FILE or use text records"
            )
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
        )

    def render_segments(self, messages: list[dict], train_on_prompt: bool = False) -> list[Segment]:
        """The rendered conversation as segments, assistant turns marked as trained."""
        segments, done = [], ""
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt = self.render(messages[:i], add_generation_prompt=True)
                if not prompt.startswith(done):
                    raise SftplugError("the chat template does not render conversations prefix-stably; cannot mask")
                segments.append(Segment(prompt[len(done) :], train_on_prompt))
                done = prompt
            upto = self.render(messages[: i + 1])
            if not upto.startswith(done):
                raise SftplugError("the chat template does not render conversations prefix-stably; cannot mask")
            segments.append(Segment(upto[len(done) :], message["role"] == "assistant" or train_on_prompt))
            done = upto
        return [s for s in segments if s.text]


def _compile_template(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise SftplugError(f"the chat template does not compile: {exc}") from None
