"""Training records: their formats, bad records (reading them: :mod:`sftplug.data.sources`).

A record is chat (``messages``), prompt/completion, Alpaca (``instruction``/``output``) or
``text``; the format is detected once per file or given. A bad record is an error naming
the file, the line and the problem, or is skipped and counted (:class:`BadLog`).
"""

from __future__ import annotations

from sftplug.errors import SftplugError

FORMATS = ("chat", "prompt", "alpaca", "text")
ROLES = ("system", "user", "assistant")
SHOW_LINES = 5  # bad / truncated records named in the summary
_FORMAT_KEYS = {
    "chat": "a 'messages' list",
    "prompt": "'prompt' and 'completion' (or 'response')",
    "alpaca": "'instruction' and 'output'",
    "text": "a 'text' field",
}


class BadRecord(ValueError):
    """One record's problem, in words; the caller adds file and line."""


class BadLog:
    """Bad records: raise the first (default) or skip and count them."""

    def __init__(self, skip: bool):
        self.skip, self.count, self.first = skip, 0, []

    def __call__(self, path, line, problem: str) -> None:
        where = f"{path}:{line}" if line else f"{path}"
        if not self.skip:
            raise SftplugError(f"{where}: {problem} (--skip-bad-records skips bad records)")
        self.count += 1
        if len(self.first) < SHOW_LINES:
            self.first.append(where)


def detect_format(record) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "prompt" in record and ("completion" in record or "response" in record):
        return "prompt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def text_field(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"'{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise BadRecord(f"empty '{key}'")
    return value


def to_messages(record: dict, fmt: str, train_on_prompt: bool = False) -> list[dict]:
    """A record of a message format as chat messages; BadRecord says what is wrong."""
    system = text_field(record, "system", required=False) or None  # an empty system field is no system
    if system is not None and not system.strip():
        system = None
    if fmt == "chat":
        given = record["messages"]
        if not isinstance(given, list) or not given:
            raise BadRecord("'messages' must be a non-empty list")
        messages = []
        for k, m in enumerate(given, start=1):
            if not isinstance(m, dict):
                raise BadRecord(f"message {k} is not an object")
            role = m.get("role")
            if role not in ROLES:
                raise BadRecord(f"message {k} has role {role!r:.40}; expected one of {', '.join(ROLES)}")
            content = m.get("content")
            if not isinstance(content, str):
                raise BadRecord(f"message {k} ({role}) content must be a string, got {type(content).__name__}")
            if not content.strip():
                raise BadRecord(f"message {k} ({role}) has empty content")
            reasoning = m.get("reasoning_content")  # passed to the template, which renders it (Qwen3: <think>)
            if reasoning is not None and (role != "assistant" or not isinstance(reasoning, str)):
                raise BadRecord(f"message {k} ({role}): reasoning_content must be a string on an assistant message")
            messages.append(m)
        if system is not None:
            if messages[0]["role"] == "system":
                raise BadRecord("both a 'system' field and a system message")
            messages.insert(0, {"role": "system", "content": system})
    else:
        if fmt == "prompt":
            prompt = text_field(record, "prompt")
            completion = text_field(record, "completion" if "completion" in record else "response")
        elif fmt == "alpaca":
            instruction, extra = text_field(record, "instruction"), text_field(record, "input", required=False)
            prompt = instruction + (f"\n\n{extra}" if extra.strip() else "")
            completion = text_field(record, "output")
        else:
            raise BadRecord(f"unknown format {fmt}")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
    if not train_on_prompt and not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant message: nothing to train on")
    return messages


def format_problem(record, fmt: str | None, fmt_from: str) -> str | None:
    """Why ``record`` is not of the file's format ``fmt`` (None: not known yet), or None."""
    if not isinstance(record, dict):
        return f"record is a JSON {type(record).__name__}, not an object"
    if fmt is not None and _has_keys(record, fmt):
        return None
    own = detect_format(record)
    if own is None:
        keys = ", ".join(f"'{k}'" for k in list(record)[:6]) or "none"
        expected = (
            f"this file holds {fmt} records, which need {_FORMAT_KEYS[fmt]} ({fmt_from})"
            if fmt
            else "expected messages, prompt+completion, instruction+output or text "
            "(--field-map renames other fields, e.g. question=prompt,answer=completion)"
        )
        return f"record of no known format (keys: {keys}); {expected}"
    return f"a {own} record in a file of {fmt} records ({fmt_from})"


_HAS_KEYS = {
    "chat": lambda r: "messages" in r,
    "prompt": lambda r: "prompt" in r and ("completion" in r or "response" in r),
    "alpaca": lambda r: "instruction" in r and "output" in r,
    "text": lambda r: "text" in r,
}


def _has_keys(record: dict, fmt: str) -> bool:
    return _HAS_KEYS[fmt](record)
