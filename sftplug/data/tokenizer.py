"""A model folder's tokenizer: tokenizer.json, its special tokens and chat template.

The chat template is rendered in a sandboxed Jinja environment. Which characters an
assistant wrote is known while rendering: each assistant turn's text is the difference
between the conversation rendered up to and including it and the prompt rendered before
it (with the generation prompt). Those character spans become token masks through the
tokenizer's offsets (:meth:`Tokenizer.encode_masked`), so the loss mask never depends on
searching for marker tokens afterwards. A template that renders earlier turns differently
as the conversation grows gives one example per turn (:meth:`Tokenizer.render_spans`).

The model's template is read wherever transformers keeps it (sftplug.data.chat_templates); a
folder without one gets the built-in ``sftplug`` template and a warning.
``--chat-template NAME|FILE|FOLDER`` overrides either (:meth:`Tokenizer.set_chat_template`).

A turn may end with another token than the tokenizer's EOS (Gemma's ``<end_of_turn>``, Llama 3's
``<|eot_id|>``): the folder's generation_config.json lists every id generation stops at. Those
tokens, beside EOS, end assistant turns in the labels (:attr:`Tokenizer.stop_tokens`) and stop
generation (:attr:`Tokenizer.stop_ids`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from sftplug.data.chat_templates import (
    BUILTIN_TEMPLATES,
    CONFIG_FILE,
    DEFAULT_TEMPLATE,
    PROCESSOR_TEMPLATE_FILE,
    TEMPLATE_FILE,
    ChatTemplateError,
    compile_template,
    model_templates,
    read_tokenizer_config,
    resolve_with_source,
)
from sftplug.errors import SftplugError

GENERATION_CONFIG = "generation_config.json"


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


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
        config = read_tokenizer_config(folder)
        self.folder = folder
        self.config = config
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token")) or self.eos_token
        self.templates = model_templates(folder, config)  # name -> (template, file)
        self.template_warning = None  # set where the model has no template of its own
        if "default" in self.templates:
            self.chat_template, self.template_source = self.templates["default"]
        elif self.templates:  # transformers' apply_chat_template refuses these too
            self.chat_template = None
            self.template_source = f"none ({', '.join(sorted(self.templates))} but no 'default')"
        else:
            self.chat_template = BUILTIN_TEMPLATES[DEFAULT_TEMPLATE]
            self.template_source = f"built-in '{DEFAULT_TEMPLATE}' (the model has none)"
            self.template_warning = (
                f"{folder} has no chat template ({TEMPLATE_FILE}, {CONFIG_FILE} or {PROCESSOR_TEMPLATE_FILE}); "
                f"conversations are rendered with sftplug's built-in '{DEFAULT_TEMPLATE}' template, which the "
                "model has never seen: give --chat-template NAME|FILE for the one it was trained with")
        if chat_template:  # a template string or a built-in name
            self.chat_template = BUILTIN_TEMPLATES.get(chat_template, chat_template)
            self.template_source = f"built-in '{chat_template}'" if chat_template in BUILTIN_TEMPLATES else "given"
            self.template_warning = None
        self.eos_id = self.token_id(self.eos_token)
        self.bos_id = self.token_id(self.bos_token)
        self.pad_id = self.token_id(self.pad_token)
        if self.pad_id is None:
            self.pad_id = 0
        # EOS first, then the other ids generate() stops at (those this tokenizer has)
        ids = [self.eos_id] + [i for i in generation_eos_ids(folder) if self.backend.id_to_token(i) is not None]
        self.stop_ids = tuple(dict.fromkeys(i for i in ids if i is not None))
        self.stop_tokens = tuple(self.backend.id_to_token(i) for i in self.stop_ids)
        self._file_hash = None
        self._template_for = None  # the template source _compiled() last compiled

    def set_chat_template(self, value: str | None) -> None:
        """Apply ``--chat-template``; None keeps the current template.

        value: the name of one of the model's templates (as ``apply_chat_template(chat_template=NAME)``
        takes it; before the built-in names), or what :func:`resolve_chat_template` takes.
        """
        resolved = self.templates.get(value) if value else None
        resolved = resolved or resolve_with_source(value)
        if resolved is not None:
            self.chat_template, self.template_source = resolved
            self.template_warning = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def fingerprint(self) -> str:
        """A hash of everything that decides tokens and masks: tokenizer.json, template, specials."""
        if self._file_hash is None:
            self._file_hash = hashlib.sha256((self.folder / "tokenizer.json").read_bytes()).hexdigest()
        parts = [self._file_hash, self.chat_template, self.bos_token, self.eos_token, self.pad_token, self.pad_id,
                 self.stop_tokens]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    # -- encoding ------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]):
        """Encodings (ids and character offsets) for many texts at once."""
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def encode_masked(self, texts: list[str], spans: list[list[tuple[int, int]]]):
        """Token ids and per-token trained flags for many texts, from trained character spans.

        texts: the rendered documents; spans: per text, sorted disjoint (start, end)
        character spans whose tokens are trained. A token is trained when it covers any
        trained character (the tokenizer's offsets decide, as HF's assistant masks do).
        Returns (ids int32 [total], trained bool [total], lengths int64 [len(texts)]).
        """
        return self.masked_ids(self.encode_batch(texts), spans)

    def masked_ids(self, encodings, spans: list[list[tuple[int, int]]]):
        """:meth:`encode_masked` for texts already encoded with :meth:`encode_batch`."""
        flat: list[int] = []
        lengths: list[int] = []
        marks: list[tuple[int, int]] = []  # trained token ranges, in flat positions
        for encoding, text_spans in zip(encodings, spans):
            base, ids = len(flat), encoding.ids
            n = len(ids)
            flat += ids
            lengths.append(n)
            for a, b in text_spans:
                first = _covering_token(encoding, range(a, b))
                if first is None:
                    continue
                last = _covering_token(encoding, range(b - 1, a - 1, -1))
                while last + 1 < n and (encoding.token_to_chars(last + 1) or (b, b))[0] < b:
                    last += 1  # a character split over several tokens (byte-level BPE)
                marks.append((base + first, base + last + 1))
        trained = np.zeros(len(flat), dtype=bool)
        for a, b in marks:
            trained[a:b] = True
        return np.array(flat, dtype=np.int32), trained, np.array(lengths, dtype=np.int64)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- chat template -----------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        from jinja2.runtime import new_context

        template, base = self._compiled()
        # Template.render() merges the environment's globals into a new dict on every call,
        # which is most of its cost for short conversations; the merged dict is built once
        # (``base``) and shared instead. The output is the same.
        variables = dict(base, messages=messages, add_generation_prompt=add_generation_prompt)
        context = new_context(template.environment, template.name, template.blocks, variables, shared=True)
        try:
            return "".join(template.root_render_func(context))
        except Exception as exc:  # TemplateError, raise_exception(), SecurityError, TypeError ...
            raise ChatTemplateError(f"the chat template failed: {exc}") from None

    def _compiled(self):
        if self.chat_template is None:
            raise SftplugError(f"{self.folder}: its chat templates ({', '.join(sorted(self.templates))}) have none "
                               "named 'default', which transformers renders; choose one with --chat-template NAME")
        if self._template_for != self.chat_template:
            template = compile_template(self.chat_template)
            self._template_base = (template, {
                **template.globals,
                "bos_token": self.bos_token or "",
                "eos_token": self.eos_token or "",
                "pad_token": self.pad_token or "",
            })  # fmt: skip
            self._template_for = self.chat_template
        return self._template_base

    def render_spans(self, messages: list[dict], train_on_prompt: bool = False,
                     train_turns: str = "all") -> tuple[list[tuple[str, list]], int]:
        """The examples one conversation trains, each (rendered text, trained character spans); turns lacking EOS.

        Assistant turn k is trained in the context the template shows when it is generated:
        its span runs from the end of messages[:k] rendered with the generation prompt to
        the end of messages[:k + 1] rendered (whitespace the template puts after the turn's
        last stop token, EOS or another of :attr:`stop_tokens`, is not trained). Turns whose
        renders extend one text share one example.
        A template that renders earlier turns differently once later ones are added (Qwen3
        drops the reasoning of earlier turns) starts a new example there, in which the
        earlier turns are context only. train_turns "last" trains only the final assistant
        turn; train_on_prompt trains the whole text. Two renders per trained turn.
        """
        if train_on_prompt:
            text = self.render(messages)
            return [(text, [(0, len(text))])], 0
        turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        if train_turns == "last":
            turns = turns[-1:]
        examples, text, spans, without_eos = [], "", [], 0
        for i in turns:
            prompt = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (prompt.startswith(text) and upto.startswith(text)):  # earlier turns rendered anew
                if spans:
                    examples.append((text, spans))
                text, spans = "", []
            start = len(prompt) if upto.startswith(prompt) else _common_prefix(prompt, upto)
            start, end = max(start, len(text)), len(upto)
            if self.stop_tokens:
                turn_end = _turn_end(upto, start, end, self.stop_tokens)
                if turn_end is not None:
                    end = turn_end  # the template's separator after the turn's end is not a target
                else:
                    without_eos += 1
            if end > start:
                spans.append((start, end))
            text = upto
        if not turns or messages[-1]["role"] != "assistant":
            whole = self.render(messages)  # later turns are context for none of the trained ones
            if whole.startswith(text):
                text = whole
        if spans or not examples:
            examples.append((text, spans))
        return examples, without_eos


def generation_eos_ids(folder: Path) -> list[int]:
    """The ids transformers' generate() stops at for a model folder: generation_config.json's
    ``eos_token_id`` (an id or a list) where the folder has that file, else config.json's (a
    vision-language one's in its text_config)."""
    path = folder / GENERATION_CONFIG
    config = _json_object(path) if path.is_file() else _json_object(folder / "config.json")
    value = config.get("eos_token_id", (config.get("text_config") or {}).get("eos_token_id"))
    return [i for i in (value if isinstance(value, list) else [value]) if isinstance(i, int)]


def _json_object(path: Path) -> dict:
    """A JSON object file's content ({} where there is no such file)."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SftplugError(f"{path}: cannot be read as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise SftplugError(f"{path}: not a JSON object")
    return config


def _turn_end(text: str, start: int, end: int, stop_tokens) -> int | None:
    """Where the assistant turn in text[start:end] ends: after its last stop token, where only
    whitespace follows it; None when no stop token ends it."""
    ends = []
    for token in stop_tokens:
        k = text.rfind(token, start, end)
        if k >= 0 and not text[k + len(token) : end].strip():
            ends.append(k + len(token))
    return max(ends, default=None)


def _covering_token(encoding, chars) -> int | None:
    for c in chars:
        t = encoding.char_to_token(c)
        if t is not None:
            return t
    return None


def _common_prefix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # largest n with a[:n] == b[:n]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
