"""Where training rows come from: local files/folders or hub datasets, mixed deterministically."""
from __future__ import annotations

import json
import logging
from array import array
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import Field, model_validator

from posttrain.data.eval_references import Decontamination
from posttrain.data.formats import BadRow, Format, to_messages
from posttrain.core.errors import UserError
from posttrain.core.strict import StrictModel
from posttrain.core.context import in_recipe

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
    if config.decontaminate:  # the evaluation references are part of what the data is
        for group in ("files", "task_dirs"):
            for i, value in enumerate(getattr(config.decontaminate, group)):
                found[f"data.decontaminate.{group}.{i}"] = value
    return found


class DataConfig(StrictModel):
    sources: list[DataSource] = Field(min_length=1)
    test_size: float | int | None = Field(None, gt=0, description="Held-out eval rows: a fraction or a count.")
    eval_sources: list[DataSource] | None = Field(
        None, description="Eval data from a named split or file, e.g. [{hub: org/data, split: test}].")
    on_bad_rows: Literal["error", "skip"] = "error"
    warn_skipped_share: float = Field(0.1, ge=0, le=1, description="Warn when a source loses more than this "
                                                                     "share of its rows to bad-row skips.")
    max_length: int = Field(1024, gt=0, description="Tokens per sample.")
    decontaminate: Decontamination | None = Field(
        None, description="Check rows against evaluation items first (drop or flag the ones that contain one).")
    overlong: Literal["truncate", "drop"] = "truncate"
    workers: int | None = Field(None, ge=1, description="Processes that tokenise while preparing the data (default: "
                                                         "the CPU count, at most 8; small data is done in-process).")


def source_files(source: DataSource, recipe_dir: Path) -> list[Path]:
    path = in_recipe(source.path, recipe_dir)
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


def iter_source_rows(source: DataSource, recipe_dir: Path) -> Iterator[tuple[str, int, Any]]:
    """(file label, 1-based row number, raw row) for every row of a source, read incrementally (a hub
    or parquet source through Arrow, a .jsonl file line by line). Rows are numbered by the line they
    are on in .jsonl and .csv files (the header is line 1), by position elsewhere."""
    if source.hub:
        ds = load_hub_dataset(source)
        for i, row in enumerate(ds):
            yield source.label, i + 1, row
        return
    for file in source_files(source, recipe_dir):
        if file.suffix == ".jsonl":
            yield from _jsonl_rows(file)
        elif file.suffix == ".json":
            try:
                data = json.loads(_utf8_text(file))
            except json.JSONDecodeError as exc:
                raise UserError(f"{file}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
            if not isinstance(data, list):
                raise UserError(f"{file}: a .json data file must hold a list of rows")
            yield from ((str(file), i + 1, row) for i, row in enumerate(data))
        elif file.suffix == ".csv":
            yield from _csv_rows(file)
        else:
            import datasets

            try:
                ds = datasets.load_dataset(file.suffix[1:], data_files=str(file), split="train")
            except Exception as exc:  # pyarrow and datasets raise many types for a damaged file
                raise UserError(f"{file}: cannot be read as {file.suffix[1:]} ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
            yield from ((str(file), i + 1, row) for i, row in enumerate(ds))


def _check_text_bytes(file: Path, head: bytes) -> None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{file}: UTF-16 text; data files must be UTF-8 (save it again as UTF-8)")
    if b"\x00" in head:
        raise UserError(f"{file}: binary data, not a text file of rows")


def _utf8_text(file: Path) -> str:
    data = file.read_bytes()
    _check_text_bytes(file, data[:8192])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{file}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                        "save the file as UTF-8") from None


def _jsonl_rows(file: Path) -> Iterator[tuple[str, int, Any]]:
    """Line by line (not through Arrow), so a bad row is reported by its line number and rows with
    differing shapes are each checked instead of failing the whole file."""
    with open(file, "rb") as handle:
        _check_text_bytes(file, handle.read(8192))
        handle.seek(0)
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield str(file), number, BadRow("", f"not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                                                    "save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield str(file), number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield str(file), number, BadRow("", f"invalid JSON: {exc.msg}")


def _csv_rows(file: Path) -> Iterator[tuple[str, int, Any]]:
    """Every cell a string, as written (an answer `2` stays "2"); a row with more or fewer cells than
    the header is a bad row on its own line. Read as a stream: a large CSV never sits in memory whole."""
    import csv

    def lines(handle):  # decoded one line at a time, so a bad byte is reported on its line
        for number, line in enumerate(handle, 1):
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{file}: line {number}: not UTF-8 text (byte 0x{line[exc.start]:02x}); "
                                "save the file as UTF-8") from None

    with open(file, "rb") as handle:
        _check_text_bytes(file, handle.read(8192))
        handle.seek(0)
        reader = csv.reader(lines(handle))
        header = next(reader, None)
        if not header:
            raise UserError(f"{file}: empty CSV file (no header row)")
        for cells in reader:
            number = reader.line_num
            if not cells:
                continue
            if len(cells) != len(header):
                yield str(file), number, BadRow("", f"has {len(cells)} cells, the header has {len(header)}")
                continue
            yield str(file), number, dict(zip(header, cells))


def load_hub_dataset(source: DataSource, split: str | None = None):
    """A hub source (a hub id, or a local folder laid out like a hub repo) through `datasets`, with the
    mistakes people make named: several configs and none chosen, a missing dataset or split."""
    import datasets

    try:
        return datasets.load_dataset(source.hub, source.name, split=split or source.split, revision=source.revision)
    except Exception as exc:  # datasets raises many types for a missing/unreachable dataset
        if "config name is missing" in str(exc).lower():
            configs = hub_configs(source.hub)
            listed = f" ({', '.join(configs)})" if configs else ""
            raise UserError(f"{source.label}: the dataset has several configs and no default: choose one with "
                            f"`name:`{listed}") from None
        raise UserError(f"could not load dataset {source.hub!r} split {source.split!r}: {exc}") from exc


def hub_configs(hub: str) -> list[str]:
    """The config names of a hub dataset (from the local cache or a local folder when offline)."""
    try:
        import datasets

        return list(datasets.get_dataset_config_names(hub))
    except Exception:  # noqa: BLE001 - only used to make an error message more helpful
        return []


def local_hub_configs(folder: Path) -> tuple[list[str], str | None] | None:
    """(config names, default) from a local hub-style folder's README front matter, or None if it has none.

    Read without `datasets`, so `posttrain validate` can say a config is missing before anything runs."""
    import yaml

    readme = folder / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    try:
        front = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    configs = front.get("configs") if isinstance(front, dict) else None
    if not isinstance(configs, list):
        return None
    names = [c.get("config_name") for c in configs if isinstance(c, dict) and c.get("config_name")]
    default = next((c.get("config_name") for c in configs if isinstance(c, dict) and c.get("default")), None)
    if len(names) == 1:
        default = names[0]
    return names, default


def config_problems(config: "DataConfig", recipe_dir: Path, prefix: str = "data") -> list[tuple[str, str]]:
    """Hub sources that are local hub-style folders: a config must be named when there are several."""
    problems = []
    for group in ("sources", "eval_sources"):
        for i, source in enumerate(getattr(config, group) or []):
            if not source.hub:
                continue
            folder = in_recipe(source.hub, recipe_dir)
            found = local_hub_configs(folder) if folder.is_dir() else None
            if not found:
                continue
            names, default = found
            where = f"{prefix}.{group}.{i}.name"
            if source.name is None and default is None and len(names) > 1:
                problems.append((where, f"{source.hub} has several configs and no default: choose one "
                                        f"({', '.join(names)})"))
            elif source.name is not None and source.name not in names:
                problems.append((where, f"{source.name!r} is not a config of {source.hub} ({', '.join(names)})"))
    return problems


@dataclass
class SourceCount:
    """What reading one source found: rows read and bad rows skipped, by reason."""

    read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, bad: BadRow) -> None:
        reason = skip_reason(bad)
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def row_normaliser(fmt: str) -> Callable[[dict, DataSource], dict]:
    """How a row of a stage's data format becomes what it trains on: messages for chat (each source's
    own `format`), prompt/chosen/rejected message lists for preference data. The one place both the
    prepared-data step and `posttrain validate --data` get it from."""
    if fmt == "preference":
        from posttrain.data.preferences import to_preference

        return lambda row, source: to_preference(row)
    return lambda row, source: to_messages(row, source.format)


def normalise_row(raw: Any, source: DataSource, normalise) -> dict:
    """One raw row, renamed by the source's `columns` and normalised; a bad row raises BadRow."""
    if isinstance(raw, BadRow):
        raise raw
    if not isinstance(raw, dict):
        raise BadRow("", "a row must be a mapping")
    return normalise({source.columns.get(k, k): v for k, v in raw.items()}, source)


def bad_row_message(file: str, number: int, bad: BadRow) -> str:
    """`file: row N: field F: message`, the way every bad row is named."""
    where = f" field {bad.field}:" if bad.field else ""
    return f"{file}: row {number}:{where} {bad}"


def normalised_rows(source: DataSource, index: int, config: DataConfig, recipe_dir: Path, normalise,
                    count: SourceCount) -> Iterator[tuple[dict, dict]]:
    """({"file", "row"}, normalised row) for every usable row of one source, streamed. A bad row ends the
    run with `file: row N: field F: message`, or is counted in `count` under `on_bad_rows: skip`."""
    for file, number, raw in iter_source_rows(source, recipe_dir):
        count.read += 1
        try:
            row = normalise_row(raw, source, normalise)
        except BadRow as bad:
            if config.on_bad_rows == "error":
                raise UserError(f"{bad_row_message(file, number, bad)} (fix the row, or set on_bad_rows: skip)") from None
            count.skip(bad)
            continue
        yield {"file": file, "row": number}, {**row, "source": index}


def mixture_rows(source: DataSource, kept: int, rng: random.Random) -> array:
    """Positions (0..kept-1) of one source's usable rows in the mixture: shuffled, repeated or cut by
    `weight`, cut by `max_samples`. An index array (8 bytes a row), never a copy of the rows; shuffled
    with the same generator calls as shuffling the rows themselves, so the order is the rows' order."""
    order = array("q", range(kept))
    rng.shuffle(order)
    if source.weight is not None:
        whole, frac = divmod(source.weight, 1)
        order = order * int(whole) + order[: round(frac * kept)]
    if source.max_samples is not None:
        order = order[: source.max_samples]
    return order


def source_summary(stats: dict[str, Any], config: DataConfig, source: DataSource, count: SourceCount, used: int,
                   contaminated: int | None) -> None:
    """Add one source's counts to `stats`, warn when it lost many rows, and refuse a source left empty."""
    lost = sum(count.skipped.values())
    read, skipped = count.read, count.skipped
    stats["rows_read"] += read
    stats["bad_rows_skipped"] += lost
    stats["sources"].append({"source": source.label, "rows_read": read, "rows_used": used,
                             "skipped": lost, "skipped_by_reason": skipped,
                             **({"contaminated": contaminated} if contaminated is not None else {})})
    if read and lost / read > config.warn_skipped_share:
        top = max(skipped, key=skipped.get)
        message = (f"{source.label}: {lost} of {read} rows ({lost / read:.0%}) skipped as bad; most often: "
                   f"{top} ({skipped[top]})")
        stats["warnings"].append(message)
        logging.getLogger("posttrain.data").warning("%s", message)
    if not used and contaminated and config.decontaminate.policy == "drop":
        message = f"{source.label}: all {contaminated} usable rows contain evaluation items; it contributes nothing"
        stats["warnings"].append(message)
        logging.getLogger("posttrain.data").warning("%s", message)
    elif not used:
        reasons = "; ".join(f"{r} ({n})" for r, n in sorted(skipped.items(), key=lambda x: -x[1])[:3])
        raise UserError(f"{source.label}: no usable rows" + (f" ({lost} skipped: {reasons})" if lost else ""))


def empty_stats() -> dict[str, Any]:
    return {"rows_read": 0, "bad_rows_skipped": 0, "sources": [], "warnings": []}


class Contamination:
    """Checks normalised rows against the evaluation items and remembers what it found."""

    def __init__(self, config: Decontamination, recipe_dir: Path):
        from posttrain.data.decontam import Index
        from posttrain.data.eval_references import reference_items

        self.config = config
        self.index = Index.build(reference_items(config, recipe_dir), n=config.n, min_words=config.min_words)
        self.found: list[dict[str, Any]] = []

    def filter(self, rows: list[tuple[dict, dict]], source: str) -> tuple[list[tuple[dict, dict]], int]:
        """The rows to keep (all of them when flagging) and how many were contaminated."""
        found = [0]
        kept = list(self.stream(rows, source, self.config.workers if len(rows) >= 20000 else 1, found))
        return kept, found[0]

    def stream(self, rows, source: str, workers: int, found: list[int]):
        """The rows to keep, streamed; every hit is counted in `found[0]` and remembered for removed.jsonl.
        With `workers` > 1 the rows are checked by worker processes, with a progress bar."""
        from tqdm.auto import tqdm

        from posttrain.data.decontam import scan

        progress = tqdm(unit="rows", desc=f"decontaminating {source}", disable=workers <= 1)
        for where, row, match in scan(rows, self.index, workers=workers):
            progress.update()
            if match is not None:
                found[0] += 1
                self.found.append({**where, "source": source, "task": match.task, "item": match.item,
                                   "rule": match.rule, "ngram": match.ngram, "action": self.config.policy})
                if self.config.policy == "drop":
                    continue
            yield where, row
        progress.close()

    def summary(self, checked: int) -> dict[str, Any]:
        by_task: dict[str, int] = {}
        by_rule: dict[str, dict[str, int]] = {}  # benchmark -> rule -> rows
        for hit in self.found:
            by_task[hit["task"]] = by_task.get(hit["task"], 0) + 1
            rules = by_rule.setdefault(hit["task"], {})
            rules[hit["rule"]] = rules.get(hit["rule"], 0) + 1
        share = len(self.found) / checked if checked else 0.0
        if self.config.fail_above is not None and share > self.config.fail_above:
            tasks = ", ".join(f"{t} ({n})" for t, n in sorted(by_task.items(), key=lambda x: -x[1]))
            raise UserError(f"{len(self.found)} of {checked} training rows ({share:.1%}) contain evaluation items, "
                            f"above fail_above {self.config.fail_above:.1%}: {tasks}")
        return {"decontamination": {"policy": self.config.policy, "n": self.config.n, "checked": checked,
                                    "contaminated": len(self.found), "by_task": by_task,
                                    "by_task_and_rule": by_rule, "evaluation_items": self.index.items,
                                    "generic_questions": self.index.generic_questions},
                "decontaminated_rows": len(self.found) if self.config.policy == "drop" else 0,
                "_contaminated": self.found}


def write_contamination_report(stats: dict[str, Any], out_dir: Path) -> None:
    """removed.jsonl (one line per removed or flagged row: file, row, task, item, rule, matched words) into
    the entry; the manifest keeps the counts."""
    found = stats.pop("_contaminated", None)
    if found:
        with open(out_dir / "removed.jsonl", "w", encoding="utf-8") as handle:
            for hit in found:
                handle.write(json.dumps(hit, ensure_ascii=False) + "\n")


def skip_reason(bad: BadRow) -> str:
    """A bad row's cause without its particular values, so like causes count together."""
    message = re.sub(r"'[^']*'|\d+", "…", str(bad))
    field = re.sub(r"\.\d+", "", bad.field) if bad.field else ""
    return f"{field}: {message}" if field else message
