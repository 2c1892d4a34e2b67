"""`posttrain validate --data`: read a sample of every source and say what training would accept.

Nothing is tokenised or trained; hub sources are streamed (only the sampled rows are fetched), local
files are read from the top.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from posttrain.data.formats import BadRow
from posttrain.data.sources import (DataConfig, DataSource, SourceCount, bad_row_message, iter_source_rows,
                                    load_hub_dataset, normalise_row)
from posttrain.core.errors import UserError


@dataclass
class SourceReport(SourceCount):
    source: str = ""
    accepted: int = 0
    first_problem: str | None = None
    error: str | None = None  # the source could not be read at all

    @property
    def usable(self) -> bool:
        return self.error is None and self.accepted > 0


def sample_rows(source: DataSource, recipe_dir: Path, rows: int):
    """(file label, row number, raw row) for the first `rows` rows of a source."""
    if source.hub:
        import datasets

        try:
            stream = datasets.load_dataset(source.hub, source.name, split=source.split, revision=source.revision,
                                           streaming=True)
        except Exception as exc:  # noqa: BLE001 - the same load, with the errors named as a run names them
            load_hub_dataset(source)  # raises the UserError a run would give
            raise UserError(f"could not stream {source.label}: {exc}") from exc
        return [(source.label, i + 1, row) for i, row in enumerate(itertools.islice(stream, rows))]
    return list(itertools.islice(iter_source_rows(source, recipe_dir), rows))


def inspect_source(source: DataSource, recipe_dir: Path, normalise: Callable, rows: int) -> SourceReport:
    report = SourceReport(source=source.label)
    try:
        sample = sample_rows(source, recipe_dir, rows)
    except UserError as exc:
        report.error = str(exc)
        return report
    for file, number, raw in sample:
        report.read += 1
        try:
            normalise_row(raw, source, normalise)
            report.accepted += 1
        except BadRow as bad:
            report.skip(bad)
            report.first_problem = report.first_problem or bad_row_message(file, number, bad)
    return report


def inspect_data(config: DataConfig, recipe_dir: Path, normalise: Callable, rows: int) -> list[SourceReport]:
    sources = list(config.sources) + list(config.eval_sources or [])
    return [inspect_source(source, recipe_dir, normalise, rows) for source in sources]


def format_report(stage: str, reports: list[SourceReport]) -> list[str]:
    lines = [f"{stage}:"]
    width = max(len(r.source) for r in reports)
    for r in reports:
        if r.error:
            lines.append(f"  {r.source:<{width}}  FAILS  {r.error}")
            continue
        status = "ok   " if r.usable else "EMPTY"
        lines.append(f"  {r.source:<{width}}  {status}  {r.accepted}/{r.read} rows accepted")
        for reason, count in sorted(r.skipped.items(), key=lambda x: -x[1])[:3]:
            lines.append(f"  {'':<{width}}         {count} skipped: {reason}")
        if r.first_problem:
            lines.append(f"  {'':<{width}}         first: {r.first_problem}")
    return lines


def as_json(reports: list[SourceReport]) -> list[dict[str, Any]]:
    return [json.loads(json.dumps(r.__dict__)) for r in reports]
