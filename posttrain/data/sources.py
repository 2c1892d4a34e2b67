"""Where training rows come from: local files/folders or hub datasets, mixed deterministically."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.data.formats import BadRow, Format, to_messages
from posttrain.errors import UserError
from posttrain.recipe.model import StrictModel

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataSource(StrictModel):
    path: str | None = Field(None, description="Local .jsonl/.json/.parquet/.csv file or a folder of them.")
    hub: str | None = Field(None, description="Hub dataset id.")
    name: str | None = Field(None, description="Hub dataset config name.")
    split: str = "train"
    revision: str | None = None
    columns: dict[str, str] = Field(default_factory=dict, description="Rename columns: {theirs: ours}.")
    format: Format = "auto"
    weight: float | None = Field(None, gt=0, description="Fraction of this source to use (>1 repeats it).")
    max_samples: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_origin(self) -> "DataSource":
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of `path` (local) or `hub` (dataset id)")
        return self

    @property
    def label(self) -> str:
        return self.path or f"{self.hub}[{self.split}]"


def local_data_files(config: "DataConfig") -> dict[str, str]:
    """Dotted config path -> local path of every file source, for fingerprints and existence checks."""
    found = {f"data.sources.{i}.path": s.path for i, s in enumerate(config.sources) if s.path}
    for i, s in enumerate(config.eval_sources or []):
        if s.path:
            found[f"data.eval_sources.{i}.path"] = s.path
    return found


class DataConfig(StrictModel):
    sources: list[DataSource] = Field(min_length=1)
    test_size: float | int | None = Field(None, gt=0, description="Held-out eval rows: a fraction or a count.")
    eval_sources: list[DataSource] | None = Field(
        None, description="Eval data from a named split or file, e.g. [{hub: org/data, split: test}].")
    on_bad_rows: Literal["error", "skip"] = "error"
    max_length: int = Field(1024, gt=0, description="Tokens per sample.")
    overlong: Literal["truncate", "drop"] = "truncate"


def source_files(source: DataSource, recipe_dir: Path) -> list[Path]:
    path = Path(source.path).expanduser()
    path = path if path.is_absolute() else recipe_dir / path
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise UserError(f"{path}: no {', '.join(LOCAL_SUFFIXES)} files in folder")
        return files
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    if path.suffix not in LOCAL_SUFFIXES:
        raise UserError(f"{path}: unsupported data file type (use {', '.join(LOCAL_SUFFIXES)})")
    return [path]


def _read_rows(source: DataSource, recipe_dir: Path) -> list[tuple[str, int, Any]]:
    """(file label, 1-based row number, raw row) for every row of a source."""
    rows: list[tuple[str, int, Any]] = []
    if source.hub:
        import datasets

        try:
            ds = datasets.load_dataset(source.hub, source.name, split=source.split, revision=source.revision)
        except Exception as exc:  # datasets raises many types for a missing/unreachable dataset
            raise UserError(f"could not load dataset {source.hub!r} split {source.split!r}: {exc}") from exc
        return [(source.label, i + 1, row) for i, row in enumerate(ds)]
    for file in source_files(source, recipe_dir):
        if file.suffix == ".jsonl":
            # Read line by line (not through Arrow) so a bad row is reported by its line number and
            # rows with differing shapes are each checked instead of failing the whole file.
            for number, line in enumerate(file.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append((str(file), number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    rows.append((str(file), number, BadRow("", f"invalid JSON: {exc.msg}")))
        elif file.suffix == ".json":
            try:
                data = json.loads(file.read_text())
            except json.JSONDecodeError as exc:
                raise UserError(f"{file}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
            if not isinstance(data, list):
                raise UserError(f"{file}: a .json data file must hold a list of rows")
            rows.extend((str(file), i + 1, row) for i, row in enumerate(data))
        else:
            import datasets

            ds = datasets.load_dataset(file.suffix[1:], data_files=str(file), split="train")
            rows.extend((str(file), i + 1, row) for i, row in enumerate(ds))
    return rows


def load_conversations(config: DataConfig, recipe_dir: Path, seed: int) -> tuple[list[dict], dict[str, int]]:
    """Chat/text rows of the whole mixture as messages, shuffled under `seed`, and counts for the manifest."""
    return load_rows(config, recipe_dir, seed, lambda row, source: to_messages(row, source.format))


def load_preferences(config: DataConfig, recipe_dir: Path, seed: int) -> tuple[list[dict], dict[str, int]]:
    """Preference rows as prompt/chosen/rejected message lists."""
    from posttrain.data.preferences import to_preference

    return load_rows(config, recipe_dir, seed, lambda row, source: to_preference(row))


def load_rows(config: DataConfig, recipe_dir: Path, seed: int, normalise) -> tuple[list[dict], dict[str, int]]:
    """Read, rename, normalise (or report/skip bad rows), weight and shuffle every source's rows."""
    rng = random.Random(seed)
    mixture: list[dict] = []
    stats = {"rows_read": 0, "bad_rows_skipped": 0}
    for source in config.sources:
        kept = []
        for file, number, raw in _read_rows(source, recipe_dir):
            stats["rows_read"] += 1
            try:
                if isinstance(raw, BadRow):
                    raise raw
                if not isinstance(raw, dict):
                    raise BadRow("", "a row must be a mapping")
                row = {source.columns.get(k, k): v for k, v in raw.items()}
                kept.append(normalise(row, source))
            except BadRow as bad:
                if config.on_bad_rows == "error":
                    where = f" field {bad.field}:" if bad.field else ""
                    raise UserError(f"{file}: row {number}:{where} {bad} "
                                    "(fix the row, or set on_bad_rows: skip)") from None
                stats["bad_rows_skipped"] += 1
        rng.shuffle(kept)
        if source.weight is not None:
            whole, frac = divmod(source.weight, 1)
            kept = kept * int(whole) + kept[: round(frac * len(kept))]
        if source.max_samples is not None:
            kept = kept[: source.max_samples]
        if not kept:
            raise UserError(f"{source.label}: no usable rows")
        mixture.extend(kept)
    rng.shuffle(mixture)
    stats["rows_used"] = len(mixture)
    return mixture, stats


def load_eval_rows(config: DataConfig, recipe_dir: Path, seed: int, load) -> list[dict] | None:
    """Rows of `eval_sources` (a named split or a held-out file) through the same loader, or None."""
    if not config.eval_sources:
        return None
    eval_config = config.model_copy(update={"sources": config.eval_sources, "eval_sources": None})
    return load(eval_config, recipe_dir, seed)[0]
