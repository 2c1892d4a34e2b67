"""Train/eval datasets for the training stages: eval from `eval_sources`, else a `test_size` split."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from posttrain.data.sources import DataConfig, load_eval_rows
from posttrain.context import StageContext


def train_and_eval(records: list[dict], data: DataConfig, ctx: StageContext, loader: Callable,
                   prepare: Callable[[list[dict]], list[dict]]) -> tuple[Any, Any]:
    """`records` are prepared training rows; `loader` reads eval sources and `prepare` readies them."""
    import datasets

    dataset = datasets.Dataset.from_list(records)
    eval_rows = load_eval_rows(data, ctx.recipe_dir, ctx.seed, loader)
    if eval_rows is not None:
        return dataset, datasets.Dataset.from_list(prepare(eval_rows))
    if data.test_size:
        size = data.test_size
        split = dataset.train_test_split(test_size=size if size < 1 else int(size), seed=ctx.seed)
        return split["train"], split["test"]
    return dataset, None
