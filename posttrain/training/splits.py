"""The train/eval datasets a training stage reads: its prepared data entry, memory-mapped, checked to be
tokenised as the stage tokenises."""
from __future__ import annotations

import hashlib
from typing import Any

from posttrain.core.context import StageContext
from posttrain.data.prepare import open_prepared
from posttrain.hf.tokenizer_check import tokenizer_hash

# Counts a training stage repeats from its prepared data (the per-source table stays in the data entry).
DATA_COUNTS = ("rows_read", "rows_used", "bad_rows_skipped", "truncated_samples", "dropped_samples",
               "train_samples", "eval_samples", "decontaminated_rows", "tokens", "label_tokens")


def prepared_datasets(ctx: StageContext, tokenizer, input_name: str = "data") -> tuple[Any, Any, dict[str, Any]]:
    """(train, eval or None, counts) from the stage's prepared data input."""
    import time

    started = time.perf_counter()
    prepared = ctx.inputs[input_name]
    check_tokenization(prepared.manifest, tokenizer, ctx.name)
    train = open_prepared(prepared.path, "train", ctx.work_dir)
    evaluation = open_prepared(prepared.path, "eval", ctx.work_dir)
    found = prepared.manifest.get("metrics", {})
    counts = {key: found[key] for key in DATA_COUNTS if key in found}
    counts["prepared_data"] = prepared.key
    counts["data_seconds"] = round(time.perf_counter() - started, 3)  # opening the files: no tokenising here
    return train, evaluation, counts


def tokenization_fingerprint(tokenizer) -> str:
    """What decides how rows become tokens: the vocabulary, the template and the special tokens."""
    parts = [tokenizer_hash(tokenizer), tokenizer.chat_template or "", str(tokenizer.eos_token_id),
             str(tokenizer.bos_token_id)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def check_tokenization(prepared: dict[str, Any], tokenizer, stage: str) -> None:
    """A training stage's tokenizer must be the one its prepared data was made with."""
    made_with = prepared.get("metrics", {}).get("tokenization")
    if made_with and made_with != tokenization_fingerprint(tokenizer):
        raise RuntimeError(f"stage {stage!r}: its prepared data was tokenised with a different tokenizer or chat "
                           "template than the stage now loads (a posttrain bug: please report it)")
