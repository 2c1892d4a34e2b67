"""Every common chat-data format, normalised to OpenAI-style `messages`, with precise bad-row errors.

Formats: OpenAI `messages`; ShareGPT `conversations` (`from`/`value`); Alpaca
(`instruction`/`input`/`output`); `prompt`/`completion`; plain `text` (no roles: trained on whole).
"""
from __future__ import annotations

from typing import Any, Literal

Format = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"]
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


class BadRow(ValueError):
    """A row that cannot be used; `field` names the offending field (dotted, e.g. messages.2.role)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def detect_format(row: dict[str, Any]) -> Format:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    raise BadRow("", f"cannot tell the format from columns {sorted(row)}; expected one of messages, "
                     "conversations, instruction/output, prompt/completion or text (or set `columns:`)")


def to_messages(row: dict[str, Any], fmt: Format = "auto") -> dict[str, Any]:
    """{'messages': [...]} for chat formats, {'text': ...} for plain text. Raises BadRow."""
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt == "text":
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise BadRow("text", "text must be a non-empty string")
        return {"text": text}
    if fmt == "messages":
        messages = _checked_list(row, "messages")
        out = [_message(m, f"messages.{i}", "role", "content", None) for i, m in enumerate(messages)]
    elif fmt == "sharegpt":
        turns = _checked_list(row, "conversations")
        out = [_message(m, f"conversations.{i}", "from", "value", SHAREGPT_ROLES) for i, m in enumerate(turns)]
    elif fmt == "alpaca":
        instruction = _string(row, "instruction")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise BadRow("input", "input must be a string")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        out = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _string(row, "output")}]
        if row.get("system"):
            out.insert(0, {"role": "system", "content": _string(row, "system")})
    elif fmt == "prompt_completion":
        out = _side(row, "prompt", "user") + _side(row, "completion", "assistant")
    else:
        raise BadRow("", f"unknown format {fmt!r}")
    _check_conversation(out, fmt)
    return {"messages": out}


def _checked_list(row: dict, field: str) -> list:
    value = row.get(field)
    if not isinstance(value, list) or not value:
        raise BadRow(field, f"{field} must be a non-empty list of turns")
    return value


def _string(row: dict, field: str) -> str:
    value = row.get(field)
    if value is None:
        raise BadRow(field, f"missing field {field!r}")
    if not isinstance(value, str) or not value.strip():
        raise BadRow(field, f"{field} must be a non-empty string")
    return value


def _side(row: dict, field: str, role: str) -> list[dict[str, str]]:
    """`prompt`/`completion` may be strings or message lists (TRL's conversational form)."""
    value = row.get(field)
    if isinstance(value, list):
        return [_message(m, f"{field}.{i}", "role", "content", None) for i, m in enumerate(value)]
    return [{"role": role, "content": _string(row, field)}]


def _message(turn: Any, where: str, role_key: str, content_key: str, role_map: dict | None) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise BadRow(where, "each turn must be a mapping")
    if role_key not in turn:
        raise BadRow(f"{where}.{role_key}", f"missing {role_key!r}")
    raw_role = turn[role_key]
    role = role_map.get(str(raw_role).lower()) if role_map else raw_role
    if role not in ROLES:
        known = ", ".join(sorted(role_map) if role_map else ROLES)
        raise BadRow(f"{where}.{role_key}", f"unknown role {raw_role!r} (expected one of {known})")
    unknown = set(turn) - {role_key, content_key, "name", "weight"}
    if unknown:
        raise BadRow(where, f"unknown field(s) {sorted(unknown)} in turn")
    content = turn.get(content_key)
    if not isinstance(content, str):
        raise BadRow(f"{where}.{content_key}", f"content must be a string, not {type(content).__name__}")
    if not content.strip():
        raise BadRow(f"{where}.{content_key}", "content is empty")
    return {"role": role, "content": content}


def _check_conversation(messages: list[dict[str, str]], fmt: str) -> None:
    field = {"sharegpt": "conversations", "prompt_completion": "completion"}.get(fmt, "messages")
    if messages[-1]["role"] != "assistant":
        raise BadRow(field, "conversation must end with an assistant turn")
    if not any(m["role"] == "user" for m in messages):
        raise BadRow(field, "conversation has no user turn")
    for i, m in enumerate(messages[1:], 1):
        if m["role"] == "system":
            raise BadRow(f"{field}.{i}", "a system turn may only come first")
