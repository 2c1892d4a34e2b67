"""The body of a prepared-data step: the model input's tokenizer (with the stage's template) and the
data config -> `posttrain.data.prepare`."""
from __future__ import annotations

import hashlib
from typing import Any

from posttrain.context import StageContext
from posttrain.data.prepare import prepare
from posttrain.kd.tokenizer_check import tokenizer_hash
from posttrain.training.trainer_common import load_chat_tokenizer


def tokenization_fingerprint(tokenizer) -> str:
    """What decides how rows become tokens: the vocabulary, the template and the special tokens."""
    parts = [tokenizer_hash(tokenizer), tokenizer.chat_template or "", str(tokenizer.eos_token_id),
             str(tokenizer.bos_token_id)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def run_prepare(config, ctx: StageContext) -> dict[str, Any]:
    tokenizer = load_chat_tokenizer(ctx.inputs["model"].path, config.chat_template, ctx)
    if config.format == "preference" and not tokenizer.chat_template:
        from posttrain.errors import UserError

        raise UserError("the model's tokenizer has no chat template; set base.chat_template (e.g. llama-3.1) "
                        "or the stage's chat_template")
    stats = prepare(config.format, config.data, tokenizer, ctx.recipe_dir, ctx.seed, ctx.out_dir,
                    ctx.work_dir / "prepare", assistant_only=config.assistant_only, progress=ctx.progress)
    stats["tokenization"] = tokenization_fingerprint(tokenizer)
    return stats


def check_tokenization(prepared: dict[str, Any], tokenizer, stage: str) -> None:
    """A training stage's tokenizer must be the one its prepared data was made with."""
    made_with = prepared.get("metrics", {}).get("tokenization")
    if made_with and made_with != tokenization_fingerprint(tokenizer):
        raise RuntimeError(f"stage {stage!r}: its prepared data was tokenised with a different tokenizer or chat "
                           "template than the stage now loads (a posttrain bug: please report it)")
