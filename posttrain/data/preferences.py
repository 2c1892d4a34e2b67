"""Preference rows normalised to conversational `prompt` / `chosen` / `rejected` message lists.

Accepted shapes:
- `prompt`, `chosen`, `rejected` as strings, or as message lists (TRL's conversational form);
- the full-conversation style (UltraFeedback-binarized): `chosen` and `rejected` are whole conversations
  that repeat the prompt; the shared turns become the prompt, and they must be identical.
"""
from __future__ import annotations

from typing import Any

from posttrain.data.formats import ROLES, BadRow, _message


def to_preference(row: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    for field in ("chosen", "rejected"):
        if field not in row or row[field] is None:
            raise BadRow(field, f"missing field {field!r}")
    chosen, rejected = _turns(row["chosen"], "chosen"), _turns(row["rejected"], "rejected")
    prompt_value = row.get("prompt")
    if _is_full_conversation(chosen) or _is_full_conversation(rejected):
        shared = _shared_prompt(chosen, rejected)
        if prompt_value is not None and prompt_value != "":
            prompt = _turns(prompt_value, "prompt", default_role="user")
            if prompt != shared[: len(prompt)] and prompt != shared:
                raise BadRow("prompt", "prompt differs from the conversation repeated in chosen/rejected")
        prompt, chosen, rejected = shared, chosen[len(shared):], rejected[len(shared):]
    else:
        if prompt_value is None:
            raise BadRow("prompt", "missing field 'prompt' (and chosen/rejected do not repeat a prompt)")
        prompt = _turns(prompt_value, "prompt", default_role="user")
    for field, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or side[-1]["role"] != "assistant":
            raise BadRow(field, f"{field} must end with an assistant answer")
    if not prompt or prompt[-1]["role"] == "assistant":
        raise BadRow("prompt", "prompt must end with a user (or system) turn")
    if chosen == rejected:
        raise BadRow("chosen", "chosen is identical to rejected: the pair teaches nothing")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _turns(value: Any, field: str, default_role: str = "assistant") -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(field, f"{field} is empty")
        return [{"role": default_role, "content": value}]
    if isinstance(value, list):
        if not value:
            raise BadRow(field, f"{field} is empty")
        return [_message(m, f"{field}.{i}", "role", "content", None) for i, m in enumerate(value)]
    raise BadRow(field, f"{field} must be a string or a list of messages")


def _is_full_conversation(turns: list[dict[str, str]]) -> bool:
    return len(turns) > 1 and turns[0]["role"] in ROLES and turns[0]["role"] != "assistant"


def _shared_prompt(chosen: list[dict], rejected: list[dict]) -> list[dict]:
    """Everything before the final assistant answer; chosen and rejected must agree on it."""
    c_prompt, r_prompt = chosen[:-1], rejected[:-1]
    if c_prompt != r_prompt:
        first = next((i for i, (a, b) in enumerate(zip(c_prompt, r_prompt)) if a != b), min(len(c_prompt), len(r_prompt)))
        raise BadRow(f"rejected.{first}", f"chosen and rejected have different prompts (they differ at turn {first})")
    return c_prompt
