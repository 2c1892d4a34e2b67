"""Sequences with their teacher targets, from our shards or a dataset in the arcee-ai layout."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from posttrain.kd.shards import LazyShard, read_index
from posttrain.core.errors import UserError
from posttrain.core.context import in_recipe


class ShardSequences:
    """Every sequence of a capture entry, read lazily: each shard's header and offsets are checked when
    it is opened, each sequence is read (memory-mapped) and checked when it is asked for. Memory does
    not grow with the number or size of shards."""

    def __init__(self, folder: Path):
        self.index = read_index(folder)
        expect = {k: self.index[k] for k in ("k", "encoding", "vocab_size", "data_fingerprint")}
        self.shards = [LazyShard(folder / item["file"], expect) for item in self.index["shards"]]
        counts = np.array([shard.num_sequences for shard in self.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])

    @property
    def meta(self) -> dict[str, Any]:
        return {k: v for k, v in self.index.items() if k != "shards"}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def lengths(self) -> np.ndarray:
        return np.concatenate([shard.lengths() for shard in self.shards]) if self.shards else np.zeros(0, np.int64)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.shards[shard].sequence(index - int(self._starts[shard]))


class LogitsDatasetSequences:
    """Rows of a dataset with input_ids, top-k ids and values per position (arcee-ai/LLama-405B-Logits).

    Such rows carry no roles, only token ids. Their first token must be the student's BOS; a doubled
    BOS (the released rows start 128000, 128000) is cut to one, with its targets, and counted. With
    `assistant_only`, assistant tokens are found from the student template's assistant header and
    end-of-turn token, and a row without an assistant turn is an error naming it.
    """

    def __init__(self, spec, recipe_dir: Path, tokenizer=None, assistant_only: bool = False):
        import datasets
        import pyarrow.compute as pc

        source = spec.hub
        if spec.path:
            source = str(in_recipe(spec.path, recipe_dir))
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
        column = ds.with_format("arrow")[:][spec.input_ids] if len(ds) else None
        # Lengths and first tokens straight from the Arrow column: no row is decoded to know them.
        self._lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False) if column is not None else np.zeros(0)
        self.bos = getattr(tokenizer, "bos_token_id", None)
        self._double_bos = np.zeros(len(ds), dtype=bool)
        if self.bos is not None and len(ds):
            starts = pc.list_element(pc.filter(column, self._lengths >= 1), 0).to_numpy(zero_copy_only=False)
            wrong = np.flatnonzero(starts != self.bos)
            if len(wrong) or (self._lengths == 0).any():
                row = int(np.flatnonzero(self._lengths >= 1)[wrong[0]]) if len(wrong) else int(np.argmin(self._lengths))
                first = int(starts[wrong[0]]) if len(wrong) else "nothing"
                raise UserError(f"teacher logits {source!r}, row {row + 1}: starts with token {first}, but the "
                                f"student's tokenizer starts every sequence with BOS {self.bos}: the data was not "
                                "tokenized for it")
            long_enough = self._lengths >= 2
            first = pc.list_element(pc.filter(column, long_enough), 0).to_numpy(zero_copy_only=False)
            second = pc.list_element(pc.filter(column, long_enough), 1).to_numpy(zero_copy_only=False)
            self._double_bos[long_enough] = (first == self.bos) & (second == self.bos)
        self.assistant_markers = _assistant_markers(tokenizer) if assistant_only else None
        self.meta = {"vocab_size": spec.vocab_size, "values": spec.value_kind, "temperature": 1.0,
                     "k": len(ds[0][spec.token_ids][0]) if len(ds) else 0, "teacher": source,
                     "double_bos_rows": int(self._double_bos.sum())}

    def __len__(self) -> int:
        return len(self.ds)

    def lengths(self) -> np.ndarray:
        return self._lengths - self._double_bos

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
        if self.bos is not None and (not len(ids) or ids[0] != self.bos):
            raise UserError(f"{where}: starts with token {ids[0] if len(ids) else 'nothing'}, but the student's "
                            f"tokenizer starts every sequence with BOS {self.bos}: the data was not tokenized for it")
        if self._double_bos[index]:
            ids, target_ids, values = ids[1:], target_ids[1:], values[1:]
        if self.assistant_markers is None:
            mask = np.ones(len(ids), dtype=bool)
        else:
            mask = assistant_token_mask(ids, *self.assistant_markers)
            if not mask.any():
                raise UserError(f"{where}: no assistant turn found (no assistant header in the token ids); set "
                                "assistant_only: false to train on every position of such data")
        return {"input_ids": ids, "loss_mask": mask, "target_ids": target_ids, "target_values": values}


def _assistant_markers(tokenizer) -> tuple[list[int], int]:
    """The token ids that open an assistant turn and the id that closes it, from the student's template."""
    if tokenizer is None or not tokenizer.chat_template:
        raise UserError("assistant_only needs the student's chat template to find assistant turns in token-only "
                        "data; set the template (e.g. chat_template: llama-3.1) or assistant_only: false")
    opened = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                           add_generation_prompt=True)
    closed = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    header = opened[len(closed):]  # the text a generation prompt adds: the assistant header
    return tokenizer.encode(header, add_special_tokens=False), tokenizer.eos_token_id


def assistant_token_mask(ids: np.ndarray, header: list[int], end_of_turn: int) -> np.ndarray:
    """True on every token after an assistant header up to and including its end-of-turn token."""
    mask = np.zeros(len(ids), dtype=bool)
    width, position, inside = len(header), 0, False
    while position < len(ids):
        if not inside and width and ids[position] == header[0] and list(ids[position:position + width]) == header:
            inside, position = True, position + width
            continue
        if inside:
            mask[position] = True
            inside = ids[position] != end_of_turn
        position += 1
    return mask


class LengthLimited:
    """Sequences cut (`truncate`) or left out (`drop`) at `max_length` tokens, counted for the manifest;
    lengths come from the source without decoding any row."""

    def __init__(self, data, max_length: int, overlong: str):
        self.data, self.max_length = data, max_length
        lengths = data.lengths()
        over = lengths > max_length
        self.indices = np.flatnonzero(~over) if overlong == "drop" else np.arange(len(data))
        self.counts = {"truncated_sequences": int(over.sum()) if overlong == "truncate" else 0,
                       "dropped_sequences": int(over.sum()) if overlong == "drop" else 0}
        self._lengths = np.minimum(lengths[self.indices], max_length)

    @property
    def meta(self) -> dict[str, Any]:
        return self.data.meta

    def __len__(self) -> int:
        return len(self.indices)

    def lengths(self) -> np.ndarray:
        return self._lengths

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        row = self.data[int(self.indices[index])]
        return {key: value[: self.max_length] for key, value in row.items()}


class PackedSequences:
    """Consecutive sequences concatenated into rows of at most `max_length` tokens.

    Position ids restart at each sequence, which transformers turns into a block-diagonal attention
    mask (no attention across sequences); the last position of each sequence is never trained on,
    because its next token belongs to the following sequence.
    """

    def __init__(self, data, max_length: int):
        self.data, self.bins, current, used = data, [], [], 0
        lengths = data.lengths().tolist() if hasattr(data, "lengths") else [len(row["input_ids"]) for row in data]
        for index, length in enumerate(lengths):
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
    the student's logits at t. Targets and next tokens are given for valid positions only ([N, k] and
    [N], in row-major order), with `valid_index` their flat positions in the [B * L] batch."""
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
    with_tail = "target_tail" in rows[0]
    target_tail = torch.zeros((batch, longest), dtype=torch.float32)
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
        if with_tail:
            target_tail[b, :n] = torch.from_numpy(row["target_tail"])
    # Only the trained positions' targets travel to the device, with their flat indices: the loss picks
    # the hidden states by index, so no boolean mask is resolved on the device (a host-device sync).
    flat = valid.reshape(-1)
    out = {"input_ids": input_ids, "attention_mask": attention, "valid": valid,
           "valid_index": flat.nonzero().squeeze(1), "next_tokens": next_tokens.reshape(-1)[flat],
           "target_ids": target_ids.reshape(-1, k)[flat], "target_values": target_values.reshape(-1, k)[flat]}
    if with_tail:
        out["target_tail"] = target_tail.reshape(-1)[flat]
    if packed:
        out["position_ids"] = position_ids
    return out
