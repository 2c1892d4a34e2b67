"""Prepared data: a data config plus a tokenizer, turned once into memory-mapped Arrow files.

Every step is streamed, so memory does not grow with the number of rows:
1. each source is read row by row, renamed, normalised (bad rows reported by file, row and field, or
   skipped and counted), checked for evaluation items, and written as JSON text to an Arrow file;
2. the mixture (shuffle, weights, max_samples, the final shuffle) is an array of row indices, 8 bytes
   a row, made with the same random calls as shuffling the rows themselves (so the order equals the
   in-memory loader's);
3. the rows are tokenised in mixture order, in chunks, by worker processes (spawned, not forked: a
   process that has run torch or tokenizers threads can deadlock a forked child), each chunk written
   as its own Arrow file, with the over-long and truncated rows counted per source;
4. the chunks are joined, held-out rows split off (`test_size`, or `eval_sources` through the same
   steps), and `train/` and `eval/` saved as `datasets` folders that training memory-maps.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import chain, islice
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from posttrain.data.formats import to_messages
from posttrain.data.sources import (Contamination, DataConfig, SourceCount, empty_stats, mixture_rows, row_normaliser,
                                    normalised_rows, source_summary, write_contamination_report)
from posttrain.core.errors import UserError

Format = Literal["chat", "preference", "generation"]
CHUNK_ROWS = 8192  # rows a worker tokenises per task (and rows of one Arrow part file)
BATCH_ROWS = 256  # rows rendered and encoded in one tokenizer call
SMALL = 2 * CHUNK_ROWS  # fewer rows than this are tokenised in this process
WORKER_START_ROWS = 100_000  # with W workers, they pay for their start-up (~3 s each) from ~this / W rows
PREPARED_FILE = "prepared.json"
# Token-id columns of each format; "generation" (prompts to answer, for exact match) adds `answer` text.
COLUMNS = {"chat": ("input_ids", "labels"), "preference": ("prompt_ids", "chosen_ids", "rejected_ids"),
           "generation": ("prompt_ids",)}
EXTRA = {"chat": (("label_tokens", "int32"),), "preference": (), "generation": (("answer", "large_string"),)}


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def prepare(fmt: Format, data: DataConfig, tokenizer, recipe_dir: Path, seed: int, out_dir: Path, work_dir: Path,
            assistant_only: bool = True, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Write `train/` (and `eval/`) into `out_dir` and return the counts for the manifest.

    `work_dir` holds the intermediate files (normalised rows, mixture, token chunks); it is cleared
    first, so a run cut short simply starts again."""
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    tokenizer_dir = work_dir / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)  # what the worker processes load
    settings = {"format": fmt, "max_length": data.max_length, "overlong": data.overlong,
                "assistant_only": assistant_only, "tokenizer": str(tokenizer_dir)}
    workers = data.workers or default_workers()
    checker = Contamination(data.decontaminate, recipe_dir) if data.decontaminate else None

    stats = _read_group("train", data, data.sources, recipe_dir, seed, work_dir, checker, fmt)
    train_parts, train_counts = _tokenize_group("train", work_dir, settings, tokenizer, workers, progress)
    _add_counts(stats, train_counts)
    if not train_counts["rows"]:
        what = "preference pairs" if fmt == "preference" else "training samples"
        labels = ", ".join(source.label for source in data.sources)
        raise UserError(f"no {what} left after dropping over-long rows from {labels} (raise data.max_length)")
    test = None
    if data.test_size and not data.eval_sources:
        test = _held_out(train_counts["rows"], data.test_size, seed)
    written = _write_splits(train_parts, out_dir, test)
    if data.eval_sources:
        eval_config = data.model_copy(update={"sources": data.eval_sources, "eval_sources": None})
        eval_stats = _read_group("eval", eval_config, data.eval_sources, recipe_dir, seed, work_dir, checker, fmt)
        eval_parts, eval_counts = _tokenize_group("eval", work_dir, settings, tokenizer, workers, progress)
        stats["eval_rows_read"] = eval_stats["rows_read"]
        written["eval"] = _write_splits(eval_parts, out_dir, np.ones(eval_counts["rows"], dtype=bool))["eval"]
    if checker:
        stats.update(checker.summary(stats["rows_read"] - stats["bad_rows_skipped"]))
        write_contamination_report(stats, out_dir)
    stats.update(format=fmt, train_samples=written["train"]["rows"], eval_samples=written["eval"]["rows"],
                 tokens=written["train"]["tokens"], max_length=data.max_length)
    if fmt == "chat":
        stats["label_tokens"] = written["train"]["label_tokens"]
    splits = [split for split in ("train", "eval") if written[split]["rows"]]
    (out_dir / PREPARED_FILE).write_text(json.dumps({"format": fmt, "columns": list(COLUMNS[fmt]),
                                                     "splits": splits,
                                                     **{k: stats[k] for k in ("train_samples", "eval_samples", "tokens")}},
                                                    indent=1))
    shutil.rmtree(work_dir, ignore_errors=True)
    return stats


def _held_out(rows: int, test_size: float | int, seed: int) -> np.ndarray:
    """Which prepared rows are held out: the same rows `datasets`' train_test_split(test_size, seed)
    picks (the first ceil(test_size * n), or test_size, of numpy's permutation under the seed). The
    rest keep the mixture's order, which is already shuffled, so nothing is read out of order."""
    import math

    count = math.ceil(test_size * rows) if test_size < 1 else int(test_size)
    if not 0 < count < rows:
        raise UserError(f"data.test_size {test_size} holds out {count} of {rows} rows: leave some of each")
    held = np.zeros(rows, dtype=bool)
    held[np.random.default_rng(seed).permutation(rows)[:count]] = True
    return held


SPLIT_FILE_BYTES = 1 << 30  # a split's Arrow files are cut at about this size


def _write_splits(parts: list[Path], out_dir: Path, held: np.ndarray | None) -> dict[str, dict[str, int]]:
    """Copy the token chunks, in order, into `train/` and `eval/` (rows where `held` is true), reading
    them as a stream (no mapping of the whole data); returns rows and token counts per split."""
    import pyarrow as pa

    written = {split: {"rows": 0, "tokens": 0, "label_tokens": 0} for split in ("train", "eval")}
    writers: dict[str, Any] = {}

    def write(split: str, batch) -> None:
        if not batch.num_rows:
            return
        current = writers.get(split)
        if current is None or current[2] > SPLIT_FILE_BYTES:
            if current:
                current[1].close()
                current[0].close()
            folder = out_dir / split
            folder.mkdir(exist_ok=True)
            sink = pa.OSFile(str(folder / f"data-{len(list(folder.glob('data-*.arrow'))):05d}.arrow"), "wb")
            current = writers[split] = [sink, pa.ipc.new_stream(sink, batch.schema), 0]
        current[1].write_batch(batch)
        current[2] += batch.nbytes
        counts = written[split]
        counts["rows"] += batch.num_rows
        counts["tokens"] += int(np.asarray(batch.column("length"), dtype=np.int64).sum())
        if "label_tokens" in batch.schema.names:
            counts["label_tokens"] += int(np.asarray(batch.column("label_tokens"), dtype=np.int64).sum())

    row = 0
    try:
        for part in parts:
            with pa.OSFile(str(part)) as source:
                for batch in pa.ipc.open_stream(source):
                    if held is None:
                        write("train", batch)
                    else:
                        mask = held[row:row + batch.num_rows]
                        write("eval", batch.filter(pa.array(mask)))
                        write("train", batch.filter(pa.array(~mask)))
                    row += batch.num_rows
    finally:
        for sink, writer, _ in writers.values():
            writer.close()
            sink.close()
    return written


def _read_group(group: str, data: DataConfig, sources, recipe_dir: Path, seed: int, work_dir: Path,
                checker: Contamination | None, fmt: Format) -> dict[str, Any]:
    """Steps 1 and 2 for the training (or held-out) sources: the row file and the mixture's index array.

    Rows are stored as UTF-8 JSON one after another in `rows-<group>.bin`, with their byte offsets in
    `rows-<group>-offsets.npy`: a worker reads the rows it needs with `pread`, so it never maps the
    whole file (page-cache pages of a mapped file count in a process's RSS)."""
    import random
    from array import array

    rng = random.Random(seed)
    stats = empty_stats()
    normalise = row_normaliser(fmt)
    mixture, offsets = array("q"), array("q", [0])
    with open(work_dir / f"rows-{group}.bin", "wb") as store:
        for index, source in enumerate(sources):
            count = SourceCount()
            kept = normalised_rows(source, index, data, recipe_dir, normalise, count)
            found = [0]
            if checker:
                kept = _checked(checker, kept, source.label, found)
            first = len(offsets) - 1
            for _, row in kept:
                store.write(json.dumps(row, ensure_ascii=False).encode("utf-8"))
                offsets.append(store.tell())
            written = len(offsets) - 1 - first
            order = mixture_rows(source, written, rng)
            source_summary(stats, data, source, count, len(order), found[0] if checker else None)
            mixture.extend(i + first for i in order)
    rng.shuffle(mixture)
    np.save(work_dir / f"mixture-{group}.npy", np.frombuffer(mixture, dtype=np.int64))
    np.save(work_dir / f"rows-{group}-offsets.npy", np.frombuffer(offsets, dtype=np.int64))
    stats["rows_used"] = len(mixture)
    return stats


def _checked(checker: Contamination, rows, label: str, found: list[int]):
    """Rows without evaluation items (all of them when flagging), streamed; workers for large sources."""
    head = list(islice(rows, 20000))
    workers = checker.config.workers if len(head) == 20000 else 1
    for where, row in checker.stream(chain(head, rows), label, workers, found):
        yield where, row


def _add_counts(stats: dict[str, Any], counts: dict[str, Any]) -> None:
    stats.update(truncated_samples=counts["truncated"], dropped_samples=counts["dropped"])
    for index, source in enumerate(stats["sources"]):
        source.update(truncated=counts["by_source"].get(str(index), {}).get("truncated", 0),
                      dropped=counts["by_source"].get(str(index), {}).get("dropped", 0))


def _tokenize_group(group: str, work_dir: Path, settings: dict[str, Any], tokenizer, workers: int,
                    progress: Callable | None) -> tuple[list[Path], dict[str, Any]]:
    """Step 3: token chunks in mixture order, by worker processes when there is enough to share."""
    from tqdm.auto import tqdm

    total = len(np.load(work_dir / f"mixture-{group}.npy", mmap_mode="r"))
    chunks = [(group, str(work_dir), number, start, min(start + CHUNK_ROWS, total), settings)
              for number, start in enumerate(range(0, total, CHUNK_ROWS))]
    parts = [work_dir / f"tokens-{group}-{i:05d}.arrow" for i in range(len(chunks))]
    counts: dict[str, Any] = {"rows": 0, "truncated": 0, "dropped": 0, "by_source": {}}
    bar = tqdm(total=total, unit="rows", desc=f"tokenising {group} rows", disable=total < SMALL)
    started = time.time()

    def add(result: dict[str, Any], rows: int) -> None:
        counts["rows"] += result["rows"]
        counts["truncated"] += result["truncated"]
        counts["dropped"] += result["dropped"]
        for source, outcome in result["by_source"].items():
            mine = counts["by_source"].setdefault(source, {"truncated": 0, "dropped": 0})
            for key in mine:
                mine[key] += outcome[key]
        bar.update(rows)
        if progress:
            progress({"step": bar.n, "total": total, "rows": bar.n / max(time.time() - started, 1e-9)})

    if workers <= 1 or total < max(SMALL, WORKER_START_ROWS // workers):
        _worker_tokenizer[settings["tokenizer"]] = tokenizer
        for chunk in chunks:
            add(tokenize_chunk(*chunk), chunk[4] - chunk[3])
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context, initializer=_start_worker) as pool:
            for chunk, result in zip(chunks, pool.map(tokenize_chunk, *zip(*chunks))):
                add(result, chunk[4] - chunk[3])
    bar.close()
    return [p for p in parts if p.exists()], counts


_worker_tokenizer: dict[str, Any] = {}


def _start_worker() -> None:
    # One process per core already: tokenizers' own threads would only compete with the other workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _tokenizer(path: str):
    if path not in _worker_tokenizer:
        from transformers import AutoTokenizer

        _worker_tokenizer[path] = AutoTokenizer.from_pretrained(path)
    return _worker_tokenizer[path]


def tokenize_chunk(group: str, work_dir: str, number: int, start: int, end: int, settings: dict[str, Any]
                   ) -> dict[str, Any]:
    """Tokenise mixture positions [start, end) into `tokens-<group>-<number>.arrow`; return the counts."""
    import pyarrow as pa  # noqa: F401 - unused; kept, as deleting a code line changes stage keys

    work = Path(work_dir)
    rows_at = _RowReader(work, group)
    try:
        return _tokenize_rows(rows_at, work, group, number, start, end, settings)
    finally:
        rows_at.close()


def _tokenize_rows(rows_at: "_RowReader", work: Path, group: str, number: int, start: int, end: int,
                   settings: dict[str, Any]) -> dict[str, Any]:
    import pyarrow as pa

    positions = np.load(work / f"mixture-{group}.npy", mmap_mode="r")[start:end]
    tokenizer = _tokenizer(settings["tokenizer"])
    fmt = settings["format"]
    ids_type = pa.list_(pa.int32())
    schema = pa.schema([(n, ids_type) for n in COLUMNS[fmt]] + [("length", pa.int32()), ("source", pa.int32())]
                       + [(n, getattr(pa, t)()) for n, t in EXTRA[fmt]])
    names = schema.names
    counts: dict[str, Any] = {"rows": 0, "truncated": 0, "dropped": 0, "by_source": {}}
    path = work / f"tokens-{group}-{number:05d}.arrow"
    with pa.OSFile(str(path) + ".tmp", "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch_start in range(0, len(positions), BATCH_ROWS):
            rows = rows_at(positions[batch_start:batch_start + BATCH_ROWS])
            columns = {n: [] for n in names}
            for row, outcome, values in _tokenized(fmt, tokenizer, rows, settings):
                if outcome:
                    counts[outcome] += 1
                    mine = counts["by_source"].setdefault(str(row["source"]), {"truncated": 0, "dropped": 0})
                    mine[outcome] += 1
                if outcome == "dropped":
                    continue
                *ids, length, extra = values
                for name, value in zip(names, (*ids, length, row["source"], *extra)):
                    columns[name].append(value)
            counts["rows"] += len(columns["length"])
            writer.write_batch(pa.record_batch([pa.array(columns[n], schema.field(n).type) for n in names],
                                               schema=schema))
    os.replace(str(path) + ".tmp", path)
    return counts


class _RowReader:
    """Normalised rows by their index, each read with one `pread` from the row file."""

    def __init__(self, work: Path, group: str):
        self.offsets = np.load(work / f"rows-{group}-offsets.npy")
        self.fd = os.open(work / f"rows-{group}.bin", os.O_RDONLY)

    def __call__(self, positions) -> list[dict]:
        return [json.loads(os.pread(self.fd, int(self.offsets[p + 1] - self.offsets[p]), int(self.offsets[p])))
                for p in positions]

    def close(self) -> None:
        os.close(self.fd)


def _tokenized(fmt: Format, tokenizer, rows: list[dict], settings: dict[str, Any]):
    """(row, outcome: None | "truncated" | "dropped", (*token columns, length, extra columns)) per row."""
    from posttrain.data.tokens import IGNORE, chat_token_ids, tokenize_preference, tokenize_rows

    max_length, drop = settings["max_length"], settings["overlong"] == "drop"
    if fmt == "chat":
        for row, (ids, labels, cut) in zip(rows, tokenize_rows(tokenizer, rows, max_length, settings["assistant_only"])):
            trained = sum(1 for label in labels if label != IGNORE)
            outcome = "dropped" if (cut and drop) or not trained else ("truncated" if cut else None)
            yield row, outcome, (ids, labels, len(ids), (trained,))
        return
    if fmt == "generation":  # the conversation up to its last turn, which is the reference answer
        for row in rows:
            if "messages" not in row:
                raise UserError("exact_match data must be chat rows (the last assistant turn is the answer)")
            messages = row["messages"]
            prompt = chat_token_ids(tokenizer, messages[:-1], add_generation_prompt=True)
            yield row, None, (prompt, len(prompt), (messages[-1]["content"].strip(),))
        return
    for row in rows:
        prompt, chosen, rejected = tokenize_preference(tokenizer, row)
        longest = len(prompt) + max(len(chosen), len(rejected))
        # trl cuts pairs at max_length (keep_start) and leaves out those whose prompt fills it.
        cut = longest > max_length
        outcome = "dropped" if (cut and drop) or len(prompt) >= max_length else ("truncated" if cut else None)
        yield row, outcome, (prompt, chosen, rejected, min(longest, max_length), ())


def open_prepared(entry: Path, split: str, cache_dir: Path):
    """A prepared split as a memory-mapped `datasets.Dataset`, or None when the entry has no such split.

    Opened through links in `cache_dir` (the stage's work folder), so whatever a trainer's `map` caches
    lands there and never in the read-only entry."""
    import datasets

    folder = entry / split
    if not folder.is_dir():
        return None
    links = cache_dir / f"prepared-{split}"
    shutil.rmtree(links, ignore_errors=True)
    links.mkdir(parents=True)
    files = sorted(folder.glob("data-*.arrow"))
    for file in files:
        (links / file.name).symlink_to(file.resolve())
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(links / f.name)) for f in files])
