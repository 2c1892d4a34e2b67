"""Chat rows to token ids and labels: -100 on every token outside assistant turns."""
from __future__ import annotations

from typing import Any

from posttrain.errors import UserError

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
