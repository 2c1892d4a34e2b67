"""Is a student's tokenizer the one the teacher logits were captured with?"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from posttrain.core.errors import UserError


def special_token_ids(tokenizer) -> dict[str, int | None]:
    return {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the token -> id mapping (added tokens included): equal hashes, equal tokenisation."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def check_compatible(meta: dict[str, Any], tokenizer, model_vocab_size: int, source: str) -> None:
    """One clear error listing every way the student's tokenizer differs from the teacher's."""
    problems = []
    if int(meta["vocab_size"]) > model_vocab_size:
        problems.append(f"teacher vocab size {meta['vocab_size']} > student's {model_vocab_size}")
    if meta.get("tokenizer_hash") and meta["tokenizer_hash"] != tokenizer_hash(tokenizer):
        problems.append("the token -> id mappings differ (tokenizer hash "
                        f"{meta['tokenizer_hash'][:12]} vs {tokenizer_hash(tokenizer)[:12]})")
    for name, teacher_id in (meta.get("special_tokens") or {}).items():
        student_id = special_token_ids(tokenizer).get(name)
        if name != "pad" and teacher_id != student_id:
            problems.append(f"{name} token id {teacher_id} (teacher) vs {student_id} (student)")
    if problems:
        raise UserError(f"the student's tokenizer is not compatible with the teacher logits in {source}: "
                        + "; ".join(problems))
