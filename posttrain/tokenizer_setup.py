"""Attach a chat template to a tokenizer and make every EOS agree with the template's end-of-turn token."""
from __future__ import annotations

import json
from pathlib import Path

from posttrain.chat_templates import ChatTemplate, resolve_chat_template
from posttrain.errors import UserError


def attach_chat_template(
    tokenizer_source: Path,
    out_dir: Path,
    chat_template: str | None,
    recipe_dir: Path,
    trust_remote_code: bool = False,
    write: bool = True,
) -> ChatTemplate | None:
    """Save the tokenizer from `tokenizer_source` into `out_dir` with the template attached.

    The tokenizer's `eos_token` becomes the template's end-of-turn token, and `generation_config.json`
    lists it first among its EOS ids (keeping the model's original EOS too, so base-style text still
    stops), which is how Llama-3.1-Instruct ships.
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
        tokenizer.save_pretrained(str(out_dir))
        write_generation_config(out_dir, tokenizer)
    return template


def write_generation_config(out_dir: Path, tokenizer) -> None:
    """Create or update generation_config.json so generation stops at the tokenizer's EOS."""
    path = out_dir / "generation_config.json"
    config_path = out_dir / "config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    model_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    eos_ids = [tokenizer.eos_token_id]
    for old in _as_list(gen.get("eos_token_id", model_config.get("eos_token_id"))):
        if old is not None and old not in eos_ids:
            eos_ids.append(old)
    gen["eos_token_id"] = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    if tokenizer.bos_token_id is not None:
        gen["bos_token_id"] = tokenizer.bos_token_id
    if tokenizer.pad_token_id is not None:
        gen["pad_token_id"] = tokenizer.pad_token_id
    gen.setdefault("_from_model_config", False)
    path.unlink(missing_ok=True)  # never write through a hard link into someone else's file
    path.write_text(json.dumps(gen, indent=2) + "\n")
    if model_config and model_config.get("eos_token_id") != gen["eos_token_id"]:
        # Keep config.json in step (as Llama-3.1-Instruct ships), or transformers re-aligns it with a warning.
        model_config["eos_token_id"] = gen["eos_token_id"]
        config_path.unlink()
        config_path.write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
