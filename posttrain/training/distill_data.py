"""Sequences with their teacher targets, from our shards or a dataset in the arcee-ai layout."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from posttrain.kd.shards import read_index, read_shard
from posttrain.errors import UserError


class ShardSequences:
    """Every sequence of a capture entry, read shard by shard (validated on load)."""

    def __init__(self, folder: Path):
        self.index = read_index(folder)
        expect = {k: self.index[k] for k in ("k", "encoding", "vocab_size", "data_fingerprint")}
        self.shards = [read_shard(folder / item["file"], expect) for item in self.index["shards"]]
        self.items = [(s, i) for s in range(len(self.shards)) for i in range(self.shards[s].num_sequences)]

    @property
    def meta(self) -> dict[str, Any]:
        return {k: v for k, v in self.index.items() if k != "shards"}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        shard, seq = self.items[index]
        return self.shards[shard].sequence(seq)


class LogitsDatasetSequences:
    """Rows of a dataset with input_ids, top-k ids and values per position (arcee-ai/LLama-405B-Logits)."""

    def __init__(self, spec, recipe_dir: Path):
        import datasets

        source = spec.hub
        if spec.path:
            local = Path(spec.path).expanduser()
            source = str(local if local.is_absolute() else recipe_dir / local)
        try:
            if source.endswith((".jsonl", ".json", ".parquet")):
                kind = "json" if source.endswith((".jsonl", ".json")) else "parquet"
                ds = datasets.load_dataset(kind, data_files=source, split="train")
            else:
                ds = datasets.load_dataset(source, split=spec.split, revision=spec.revision)
        except Exception as exc:  # datasets raises many types for a missing/unreachable dataset
            raise UserError(f"could not load teacher logits {source!r}: {exc}") from exc
        missing = [c for c in (spec.input_ids, spec.token_ids, spec.values) if c not in ds.column_names]
        if missing:
            raise UserError(f"teacher logits {source!r} lack columns {missing} (have {ds.column_names}); "
                            "map them with input_ids/token_ids/values")
        if spec.max_samples:
            ds = ds.select(range(min(spec.max_samples, len(ds))))
        self.ds, self.spec, self.source = ds, spec, source
        self.meta = {"vocab_size": spec.vocab_size, "values": spec.value_kind, "temperature": 1.0,
                     "k": len(ds[0][spec.token_ids][0]), "teacher": source}

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        row = self.ds[index]
        ids = np.asarray(row[self.spec.input_ids], dtype=np.int64)
        target_ids = np.asarray(row[self.spec.token_ids], dtype=np.int64)
        values = np.asarray(row[self.spec.values], dtype=np.float32)
        where = f"teacher logits {self.source!r}, row {index + 1}"
        if target_ids.ndim != 2 or target_ids.shape[0] != len(ids) or values.shape != target_ids.shape:
            raise UserError(f"{where}: {self.spec.token_ids} {target_ids.shape} and {self.spec.values} "
                            f"{values.shape} must be [len(input_ids)={len(ids)}, k]")
        if np.any(target_ids < 0) or np.any(target_ids >= self.spec.vocab_size) or np.any(ids >= self.spec.vocab_size):
            raise UserError(f"{where}: token ids outside the vocabulary (size {self.spec.vocab_size})")
        if not np.all(np.isfinite(values)):
            raise UserError(f"{where}: NaN or infinite values")
        return {"input_ids": ids, "loss_mask": np.ones(len(ids), dtype=bool), "target_ids": target_ids,
                "target_values": values}


class PackedSequences:
    """Consecutive sequences concatenated into rows of at most `max_length` tokens.

    Position ids restart at each sequence, which transformers turns into a block-diagonal attention
    mask (no attention across sequences); the last position of each sequence is never trained on,
    because its next token belongs to the following sequence.
    """

    def __init__(self, data, max_length: int):
        self.data, self.bins, current, used = data, [], [], 0
        for index in range(len(data)):
            length = len(data[index]["input_ids"])
            if current and used + length > max_length:
                self.bins.append(current)
                current, used = [], 0
            current.append(index)
            used += length
        if current:
            self.bins.append(current)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        parts = [self.data[i] for i in self.bins[index]]
        row = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        row["position_ids"] = np.concatenate([np.arange(len(p["input_ids"])) for p in parts])
        row["sequence_end"] = np.concatenate([np.arange(len(p["input_ids"])) == len(p["input_ids"]) - 1
                                              for p in parts])
        return row


def collate(rows: list[dict[str, np.ndarray]], pad_id: int, assistant_only: bool) -> dict[str, Any]:
    """Pad a batch. `valid[b, t]` marks positions whose next token is trained on (it exists in the same
    sequence, and is an assistant token when assistant_only); position t's stored targets pair with
    the student's logits at t."""
    import torch

    longest = max(len(r["input_ids"]) for r in rows)
    k = rows[0]["target_ids"].shape[1]
    batch = len(rows)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, longest), dtype=torch.long)
    valid = torch.zeros((batch, longest), dtype=torch.bool)
    next_tokens = torch.zeros((batch, longest), dtype=torch.long)
    target_ids = torch.zeros((batch, longest, k), dtype=torch.long)
    target_values = torch.zeros((batch, longest, k), dtype=torch.float32)
    packed = "position_ids" in rows[0]
    # Padding gets its own position run (restarting at 0), so under packing it is a separate block.
    position_ids = torch.arange(longest).repeat(batch, 1)
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        ids = torch.from_numpy(row["input_ids"])
        input_ids[b, :n], attention[b, :n] = ids, 1
        next_tokens[b, : n - 1] = ids[1:]
        mask = torch.from_numpy(np.asarray(row["loss_mask"], dtype=bool))
        valid[b, : n - 1] = mask[1:] if assistant_only else True
        if packed:
            position_ids[b, :n] = torch.from_numpy(row["position_ids"])
            position_ids[b, n:] = torch.arange(longest - n)
            valid[b, :n] &= ~torch.from_numpy(row["sequence_end"])
        target_ids[b, :n] = torch.from_numpy(row["target_ids"])
        target_values[b, :n] = torch.from_numpy(row["target_values"])
    out = {"input_ids": input_ids, "attention_mask": attention, "valid": valid, "next_tokens": next_tokens,
           "target_ids": target_ids, "target_values": target_values}
    if packed:
        out["position_ids"] = position_ids
    return out
