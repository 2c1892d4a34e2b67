"""The in-memory reference of the data path: every source read, renamed, normalised, decontaminated,
weighted and shuffled into one list. Training never uses it (`posttrain.data.prepare` streams the same
steps into Arrow files and gives the same order); the tests use it to check formats, bad-row handling,
decontamination and that the streamed order is this order."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from posttrain.data.sources import (Contamination, DataConfig, SourceCount, empty_stats, mixture_rows, normalised_rows,
                                    row_normaliser, source_summary)


def load_rows(config: DataConfig, recipe_dir: Path, seed: int, normalise) -> tuple[list[dict], dict[str, Any]]:
    """Read, rename, normalise (or report/skip bad rows), weight and shuffle every source's rows, in memory.

    Each kept row carries
    `source` (its source's index); the stats hold totals and, under `sources`, each source's rows read,
    used and skipped by reason."""
    rng = random.Random(seed)
    mixture: list[dict] = []
    stats = empty_stats()
    checker = Contamination(config.decontaminate, recipe_dir) if config.decontaminate else None
    for index, source in enumerate(config.sources):
        count = SourceCount()
        kept = list(normalised_rows(source, index, config, recipe_dir, normalise, count))
        contaminated = None
        if checker:
            kept, contaminated = checker.filter(kept, source.label)
        order = mixture_rows(source, len(kept), rng)
        source_summary(stats, config, source, count, len(order), contaminated)
        mixture.extend(kept[i][1] for i in order)
    rng.shuffle(mixture)
    stats["rows_used"] = len(mixture)
    if checker:
        stats.update(checker.summary(stats["rows_read"] - stats["bad_rows_skipped"]))
    return mixture, stats


def load_conversations(config: DataConfig, recipe_dir: Path, seed: int) -> tuple[list[dict], dict[str, int]]:
    """Chat/text rows of the whole mixture as messages, shuffled under `seed`, and counts for the manifest."""
    return load_rows(config, recipe_dir, seed, row_normaliser("chat"))


def load_preferences(config: DataConfig, recipe_dir: Path, seed: int) -> tuple[list[dict], dict[str, int]]:
    """Preference rows as prompt/chosen/rejected message lists."""
    return load_rows(config, recipe_dir, seed, row_normaliser("preference"))


def load_eval_rows(config: DataConfig, recipe_dir: Path, seed: int, load) -> list[dict] | None:
    """Rows of `eval_sources` (a named split or a held-out file) through the same loader, or None."""
    if not config.eval_sources:
        return None
    eval_config = config.model_copy(update={"sources": config.eval_sources, "eval_sources": None})
    return load(eval_config, recipe_dir, seed)[0]
