"""Chat rows to token ids and labels: -100 on every token outside assistant turns."""
from __future__ import annotations

from typing import Any

from posttrain.core.errors import UserError

IGNORE = -100


def tokenize_row(tokenizer, row: dict[str, Any], max_length: int, assistant_only: bool) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated). Plain-text rows are trained on whole, ending with EOS."""
    if "text" in row:
        ids = tokenizer(row["text"])["input_ids"] + [tokenizer.eos_token_id]
        labels = list(ids)
    else:
        if not tokenizer.chat_template:
            raise UserError(
                f"the model's tokenizer ({tokenizer.name_or_path}) has no chat template, so chat data cannot be "
                "rendered; set base.chat_template (e.g. llama-3.1) or the stage's chat_template")
        out = tokenizer.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=assistant_only)
        ids = list(out["input_ids"])
        if assistant_only:
            mask = list(out["assistant_masks"])
            if 1 not in mask:
                raise UserError(
                    "assistant_only_loss needs a chat template with {% generation %} markers around assistant "
                    "content; the tokenizer's template has none (use chat_template: llama-3.1, or set "
                    "assistant_only_loss: false)")
            labels = [t if m else IGNORE for t, m in zip(ids, mask)]
        else:
            labels = list(ids)
    truncated = len(ids) > max_length
    return ids[:max_length], labels[:max_length], truncated


def chat_token_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a rendered conversation (transformers 5 returns a BatchEncoding, not a list)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


def _plain_chat(row: dict[str, Any]) -> bool:
    return "messages" in row and not row.get("tools")


def tokenize_rows(tokenizer, rows: list[dict[str, Any]], max_length: int, assistant_only: bool
                  ) -> list[tuple[list[int], list[int], bool]]:
    """`tokenize_row` for many rows, with the same result: runs of chat rows without tools are rendered
    and tokenised in one call (the fast tokenizer encodes a batch at once), the rest one by one."""
    out: list[tuple[list[int], list[int], bool]] = []
    start = 0
    while start < len(rows):
        end = start
        while end < len(rows) and _plain_chat(rows[end]):
            end += 1
        if end - start < 2:
            out.append(tokenize_row(tokenizer, rows[start], max_length, assistant_only))
            start += 1
            continue
        if not tokenizer.chat_template:
            tokenize_row(tokenizer, rows[start], max_length, assistant_only)  # raises the clear error
        batch = tokenizer.apply_chat_template([row["messages"] for row in rows[start:end]], tokenize=True,
                                              return_dict=True, return_assistant_tokens_mask=assistant_only)
        for i, ids in enumerate(batch["input_ids"]):
            ids = list(ids)
            if assistant_only:
                mask = batch["assistant_masks"][i]
                if 1 not in mask:
                    tokenize_row(tokenizer, rows[start + i], max_length, assistant_only)  # raises the clear error
                labels = [t if m else IGNORE for t, m in zip(ids, mask)]
            else:
                labels = list(ids)
            out.append((ids[:max_length], labels[:max_length], len(ids) > max_length))
        start = end
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_preference(tokenizer, row: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) as trl's DPOTrainer makes them: the prompt rendered with a
    generation prompt, each completion rendered after the prompt, the completion starting where the two
    token sequences part (a template may render the prompt alone differently)."""
    prompt = chat_token_ids(tokenizer, row["prompt"], add_generation_prompt=True)
    chosen = chat_token_ids(tokenizer, row["prompt"] + row["chosen"])
    rejected = chat_token_ids(tokenizer, row["prompt"] + row["rejected"])
    shared = min(common_prefix(prompt, chosen), common_prefix(prompt, rejected))
    return prompt[:shared], chosen[shared:], rejected[shared:]
