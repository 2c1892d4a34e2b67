"""Attach a chat template to a tokenizer and make every EOS agree with the template's end-of-turn token."""
from __future__ import annotations

from pathlib import Path

from posttrain.hf.chat_templates import ChatTemplate, resolve_chat_template
from posttrain.hf.checkpoint_folder import save_tokenizer_files
from posttrain.core.errors import UserError


def attach_chat_template(
    tokenizer_source: Path,
    out_dir: Path,
    chat_template: str | None,
    recipe_dir: Path,
    trust_remote_code: bool = False,
    write: bool = True,
) -> ChatTemplate | None:
    """Save the tokenizer from `tokenizer_source` into `out_dir` with the template attached.

    The tokenizer's `eos_token` becomes the template's end-of-turn token everywhere (tokenizer config,
    special-token map, generation config first among its EOS ids, keeping the model's original EOS
    too so base-style text still stops), which is how Llama-3.1-Instruct ships.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source), trust_remote_code=trust_remote_code)
    template = None
    if chat_template:
        template = resolve_chat_template(chat_template, recipe_dir)
        tokenizer.chat_template = template.text
        if template.end_of_turn:
            if tokenizer.convert_tokens_to_ids(template.end_of_turn) in (None, tokenizer.unk_token_id):
                raise UserError(
                    f"chat template {template.name!r} ends turns with {template.end_of_turn!r}, "
                    f"which the tokenizer at {tokenizer_source} does not have"
                )
            tokenizer.eos_token = template.end_of_turn
    if write:
        save_tokenizer_files(out_dir, tokenizer, trust_remote_code=trust_remote_code)
    return template
