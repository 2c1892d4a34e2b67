"""Every common chat-data format, normalised to OpenAI-style `messages`, with precise bad-row errors.

Formats: OpenAI `messages`; ShareGPT `conversations` (`from`/`value`); Alpaca
(`instruction`/`input`/`output`); `prompt`/`completion`; plain `text` (no roles: trained on whole).

Tool use is normalised the way Llama-3.1 renders it: tool results (`tool`, `function`, `observation`,
`ipython` turns) become `ipython` turns, which are never trained on; an assistant turn's `tool_calls`
(one call, OpenAI-style) are kept for the template to render; ShareGPT `function_call` turns are
assistant turns whose text is the call. A `system` column (ToolACE keeps its function list there) and a
non-empty `tools` column travel with the row. `messages`/`conversations` stored as JSON strings (as the
original orca-agentinstruct does) are parsed. Turn fields that Arrow adds as null to every turn of a
column (`tool_calls`, `name`, ...) are ignored when null.
"""
from __future__ import annotations

import json
from typing import Any, Literal

Format = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"]
ROLES = ("system", "user", "assistant", "ipython")
TOOL_RESULT_ROLES = ("tool", "function", "observation", "ipython")
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant",
                 **{role: "ipython" for role in TOOL_RESULT_ROLES}}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "function_call": "assistant", **{role: "ipython" for role in TOOL_RESULT_ROLES}}
TURN_FIELDS = {"name", "weight", "tool_calls", "tool_call_id"}


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
    """{'messages': [...]} (plus 'tools' when the row has any) for chat formats, {'text': ...} for plain
    text. Raises BadRow."""
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt == "text":
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise BadRow("text", "text must be a non-empty string")
        return {"text": text}
    if fmt == "messages":
        messages, first = _drop_empty_system(_checked_list(row, "messages"), "role", "content")
        out = [_message(m, f"messages.{i}", "role", "content", MESSAGE_ROLES) for i, m in enumerate(messages, first)]
    elif fmt == "sharegpt":
        turns, first = _drop_empty_system(_checked_list(row, "conversations"), "from", "value")
        out = [_message(m, f"conversations.{i}", "from", "value", SHAREGPT_ROLES) for i, m in enumerate(turns, first)]
    elif fmt == "alpaca":
        instruction = _string(row, "instruction")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise BadRow("input", "input must be a string")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        out = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _string(row, "output")}]
    elif fmt == "prompt_completion":
        out = _side(row, "prompt", "user") + _side(row, "completion", "assistant")
    else:
        raise BadRow("", f"unknown format {fmt!r}")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise BadRow("system", "system must be a string")
    if system and system.strip() and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system})  # a separate system column (ToolACE, AutoIF)
    _check_conversation(out, fmt)
    result: dict[str, Any] = {"messages": out}
    tools = _tools(row)
    if tools:
        result["tools"] = tools
    return result


def _drop_empty_system(turns: list, role_key: str, content_key: str) -> tuple[list, int]:
    """A leading system turn with no text (orca-agentinstruct has them) says nothing: leave it out.
    Returns the turns and the index of the first one kept (so errors still name the right turn)."""
    first = turns[0] if turns else None
    if (isinstance(first, dict) and first.get(role_key) == "system"
            and isinstance(first.get(content_key), str) and not first[content_key].strip()):
        return turns[1:], 1
    return turns, 0


def _tools(row: dict) -> list | None:
    """A non-empty `tools` column: a list of function specs, or its JSON string."""
    tools = row.get("tools")
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise BadRow("tools", f"tools is not valid JSON: {exc.msg}") from None
    if tools in (None, [], {}):
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRow("tools", "tools must be a list of function specifications")
    return tools


def _checked_list(row: dict, field: str) -> list:
    value = row.get(field)
    if isinstance(value, str):  # a JSON-encoded column
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRow(field, f"{field} is a string but not valid JSON: {exc.msg}") from None
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


def _message(turn: Any, where: str, role_key: str, content_key: str, role_map: dict | None) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise BadRow(where, "each turn must be a mapping")
    if role_key not in turn:
        raise BadRow(f"{where}.{role_key}", f"missing {role_key!r}")
    raw_role = turn[role_key]
    role = role_map.get(str(raw_role).lower()) if role_map else raw_role
    if role not in ROLES:
        known = ", ".join(sorted(role_map) if role_map else ROLES)
        raise BadRow(f"{where}.{role_key}", f"unknown role {raw_role!r} (expected one of {known})")
    present = {key for key, value in turn.items() if value is not None}
    unknown = present - {role_key, content_key} - TURN_FIELDS
    if unknown:
        raise BadRow(where, f"unknown field(s) {sorted(unknown)} in turn")
    calls = _tool_calls(turn.get("tool_calls"), f"{where}.tool_calls")
    if calls and role != "assistant":
        raise BadRow(f"{where}.tool_calls", f"only assistant turns make tool calls, not {raw_role!r}")
    content = turn.get(content_key)
    if role == "ipython" and isinstance(content, (dict, list)):
        content = json.dumps(content, ensure_ascii=False)  # a structured tool result, rendered as JSON
    if calls:
        if content not in (None, "") and not isinstance(content, str):
            raise BadRow(f"{where}.{content_key}", f"content must be a string, not {type(content).__name__}")
        return {"role": role, "content": content or "", "tool_calls": calls}
    if not isinstance(content, str):
        raise BadRow(f"{where}.{content_key}", f"content must be a string, not {type(content).__name__}")
    if not content.strip():
        raise BadRow(f"{where}.{content_key}", "content is empty")
    return {"role": role, "content": content}


def _tool_calls(value: Any, where: str) -> list[dict] | None:
    """OpenAI-style tool calls -> [{'type': 'function', 'function': {'name', 'arguments': dict}}]."""
    if value is None or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRow(where, f"tool_calls is not valid JSON: {exc.msg}") from None
    if not isinstance(value, list):
        raise BadRow(where, "tool_calls must be a list")
    if len(value) != 1:
        raise BadRow(where, f"Llama-3.1 renders one tool call per assistant turn; this turn has {len(value)}")
    call = value[0]
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRow(where, "a tool call needs function.name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise BadRow(f"{where}.0.function.arguments", f"arguments are not valid JSON: {exc.msg}") from None
    if not isinstance(arguments, dict):
        raise BadRow(f"{where}.0.function.arguments", "arguments must be a mapping")
    return [{"type": "function", "function": {"name": function["name"], "arguments": arguments}}]


def _check_conversation(messages: list[dict[str, str]], fmt: str) -> None:
    field = {"sharegpt": "conversations", "prompt_completion": "completion"}.get(fmt, "messages")
    if messages[-1]["role"] != "assistant":
        raise BadRow(field, "conversation must end with an assistant turn")
    if not any(m["role"] == "user" for m in messages):
        raise BadRow(field, "conversation has no user turn")
    for i, m in enumerate(messages[1:], 1):
        if m["role"] == "system":
            raise BadRow(f"{field}.{i}", "a system turn may only come first")
