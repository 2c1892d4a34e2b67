"""Re-encoding a folder of teacher-logit shards, shard by shard (the recode_logits stage's body and
`posttrain recode`).

Each source shard is decoded once and written in the new encoding with the same sequences, so the
index lists the same shards and a killed recode resumes at the first shard it had not finished.
Memory is one shard's decoded targets. The tail (mass outside the stored ids) travels unchanged; the
compact encoding's `mass` moves what it leaves out into the tail, as a capture would.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from posttrain.core.errors import UserError
from posttrain.kd.compact import parameters as compact_parameters
from posttrain.kd.shards import COMPACT, read_index, read_shard, write_index, write_shard

ENCODINGS = ("fp16", "q8", "q10", "q12", "compact")


def recoded_meta(source: dict[str, Any], encoding: str, mass: float | None) -> dict[str, Any]:
    """The source's metadata with the new encoding (and nothing of the old one's parameters)."""
    if encoding not in ENCODINGS:
        raise UserError(f"unknown encoding {encoding!r}: one of {', '.join(ENCODINGS)}")
    if encoding == COMPACT and source.get("mode") != "topk":
        raise UserError(f"the capture holds {source.get('mode')} targets; compact stores top-k targets only "
                        "(recode to fp16 or q8/q10/q12)")
    if encoding == COMPACT and int(source["k"]) > 8192:
        raise UserError(f"the capture stores k = {source['k']} entries; compact stores at most 8192")
    if mass is not None and encoding != COMPACT:
        raise UserError("a variable number of entries per position (mass) needs encoding: compact")
    meta = {k: v for k, v in source.items() if k not in ("shards", "compact", "mass")}
    meta["encoding"] = encoding
    if encoding == COMPACT:
        meta.update(compact=compact_parameters(), mass=mass)
    return meta


def recode_capture(source: Path, out: Path, work: Path, encoding: str, mass: float | None = None,
                   progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Write `source`'s shards re-encoded into `out` (finished shards wait in `work` until all are done)."""
    index = read_index(source)
    meta = recoded_meta(index, encoding, mass)
    work.mkdir(parents=True, exist_ok=True)
    expect = {"data_fingerprint": index["data_fingerprint"], "k": index["k"]}
    started, shards, resumed, error_sum, error_count, tokens = time.time(), [], 0, 0.0, 0, 0
    total = sum(int(item.get("tokens", 0)) for item in index["shards"])
    for item in index["shards"]:
        target = work / item["file"]
        if target.exists():
            try:
                read_shard(target, {**expect, "encoding": encoding})
                shards.append(item)
                resumed += 1
                tokens += int(item.get("tokens", 0))
                continue  # finished before an interruption
            except UserError:
                target.unlink()
        shard = read_shard(source / item["file"], {**expect, "encoding": index["encoding"]})
        rows = shard.sequences(0, shard.num_sequences) if hasattr(shard, "sequences") else \
            [shard.sequence(i) for i in range(shard.num_sequences)]
        values = np.concatenate([row["target_values"] for row in rows])
        tails = [row.get("target_tail") for row in rows]
        stored, _ = write_shard(
            target, [row["input_ids"].tolist() for row in rows], [row["loss_mask"].tolist() for row in rows],
            np.concatenate([row["target_ids"] for row in rows]), values, meta,
            np.concatenate(tails) if all(t is not None for t in tails) else None)
        finite = np.isfinite(stored) & np.isfinite(values)
        error_sum += float(np.abs(stored[finite] - values[finite]).sum())
        error_count += int(finite.sum())
        shards.append(item)
        tokens += int(item.get("tokens", 0)) or len(values)
        if progress:
            progress({"step": tokens, "total": total, "tokens": tokens})
    out.mkdir(parents=True, exist_ok=True)
    for item in shards:
        os.replace(work / item["file"], out / item["file"])
    write_index(out, meta, shards)
    before = sum((source / item["file"]).stat().st_size for item in index["shards"])
    after = sum((out / item["file"]).stat().st_size for item in shards)
    positions = sum(int(item.get("tokens", 0)) for item in shards) or 1
    return {"encoding": encoding, "from_encoding": index["encoding"], "shards": len(shards),
            "shards_resumed": resumed, "tokens": positions, "source_bytes": before, "bytes": after,
            "bytes_per_token": round(after / positions, 2), "size_ratio": round(after / max(before, 1), 4),
            "mean_abs_value_error": (error_sum / error_count) if error_count else None,
            "seconds": round(time.time() - started, 3), "k": index["k"], "mode": index.get("mode"),
            **({"mass": mass} if mass is not None else {})}
