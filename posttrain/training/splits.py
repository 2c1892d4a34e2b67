"""The train/eval datasets a training stage reads: its prepared data entry, memory-mapped."""
from __future__ import annotations

from typing import Any

from posttrain.context import StageContext
from posttrain.data.prepare import open_prepared

# Counts a training stage repeats from its prepared data (the per-source table stays in the data entry).
DATA_COUNTS = ("rows_read", "rows_used", "bad_rows_skipped", "truncated_samples", "dropped_samples",
               "train_samples", "eval_samples", "decontaminated_rows", "tokens", "label_tokens")


def prepared_datasets(ctx: StageContext, tokenizer, input_name: str = "data") -> tuple[Any, Any, dict[str, Any]]:
    """(train, eval or None, counts) from the stage's prepared data input."""
    import time

    from posttrain.training.prepare_run import check_tokenization

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
