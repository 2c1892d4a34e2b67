"""Teacher-logit shards: safetensors files (never pickle) whose header carries the metadata.

A shard holds whole sequences: `input_ids` [T] int32 and `offsets` [S+1] (sequence boundaries),
`loss_mask` [T] uint8 (1 on assistant tokens for chat data), `topk_ids` [T, ceil(k*bits/8)] uint8
(bit-packed ids), `topk_values` (fp16 [T, k], or packed codes) and, in shards written since it was
added, `tail_logp` [T] float32: the exact log of the teacher's mass outside the stored ids, taken
before the values were quantised (older shards without it stay readable). Position t's targets are
the teacher's distribution for token t+1, i.e. they pair with the student's logits at t.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.kd.packing import ValueCodec, id_bits, pack_bits, unpack_bits
from posttrain.errors import UserError

FORMAT = "posttrain-topk-v1"
INDEX = "index.json"
META_FIELDS = ("format", "teacher", "teacher_key", "tokenizer_hash", "vocab_size", "k", "encoding", "id_bits",
               "mode", "samples", "temperature", "chat_template_sha256", "data_fingerprint", "values",
               "special_tokens")


@dataclass
class Shard:
    path: Path
    meta: dict[str, Any]
    input_ids: np.ndarray
    offsets: np.ndarray
    loss_mask: np.ndarray
    packed_ids: np.ndarray
    stored_values: np.ndarray
    tail_logp: np.ndarray | None = None

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    def sequence(self, index: int) -> dict[str, np.ndarray]:
        """One sequence's tokens and unpacked targets."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        k = int(self.meta["k"])
        codec = ValueCodec(self.meta["encoding"])
        row = {
            "input_ids": self.input_ids[start:end].astype(np.int64),
            "loss_mask": self.loss_mask[start:end].astype(bool),
            "target_ids": unpack_bits(self.packed_ids[start:end], int(self.meta["id_bits"]), k),
            "target_values": codec.decode(self.stored_values[start:end], k),
        }
        if self.tail_logp is not None:
            row["target_tail"] = self.tail_logp[start:end].astype(np.float32)
        return row


def write_shard(path: Path, sequences: list[list[int]], loss_masks: list[list[int]], ids: np.ndarray,
                logp: np.ndarray, meta: dict[str, Any], tail_logp: np.ndarray | None = None) -> np.ndarray:
    """Write one shard atomically (tmp file + rename: a killed capture never leaves a torn shard).

    Returns the stored values as they decode, so a caller can measure the encoding error."""
    from safetensors.numpy import save_file

    lengths = [len(s) for s in sequences]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if ids.shape[0] != offsets[-1] or logp.shape != ids.shape:
        raise ValueError(f"targets for {ids.shape[0]} positions, sequences have {offsets[-1]}")
    codec = ValueCodec(meta["encoding"])
    tensors = {
        "input_ids": np.concatenate([np.asarray(s, dtype=np.int32) for s in sequences]),
        "offsets": offsets,
        "loss_mask": np.concatenate([np.asarray(m, dtype=np.uint8) for m in loss_masks]),
        "topk_ids": pack_bits(ids.astype(np.int64), int(meta["id_bits"])),
        "topk_values": codec.encode(logp),
    }
    if tail_logp is not None:
        tensors["tail_logp"] = np.asarray(tail_logp, dtype=np.float32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={key: json.dumps(value) for key, value in meta.items()})
    os.replace(tmp, path)
    return codec.decode(tensors["topk_values"], logp.shape[-1])


def read_shard(path: Path, expect: dict[str, Any] | None = None) -> Shard:
    """Load and validate a shard; every problem is a UserError naming the file and what is wrong."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            raw_meta = handle.metadata() or {}
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
        raise UserError(f"teacher-logit shard {path} is unreadable (truncated or not safetensors): {exc}") from exc
    try:
        meta = {key: json.loads(value) for key, value in raw_meta.items()}
    except ValueError as exc:
        raise UserError(f"teacher-logit shard {path}: metadata is not valid JSON ({exc})") from exc
    missing = [n for n in ("input_ids", "offsets", "loss_mask", "topk_ids", "topk_values") if n not in arrays]
    if missing or meta.get("format") != FORMAT:
        raise UserError(f"teacher-logit shard {path}: not a {FORMAT} shard (missing {missing or 'format tag'})")
    shard = Shard(path, meta, arrays["input_ids"], arrays["offsets"], arrays["loss_mask"], arrays["topk_ids"],
                  arrays["topk_values"], arrays.get("tail_logp"))
    validate_shard(shard, expect or {})
    return shard


def validate_shard(shard: Shard, expect: dict[str, Any]) -> None:
    meta, where = shard.meta, f"teacher-logit shard {shard.path}"
    for key, value in expect.items():
        if meta.get(key) != value:
            raise UserError(f"{where}: {key} is {meta.get(key)!r}, the index says {value!r}")
    total = len(shard.input_ids)
    k, bits, vocab = int(meta["k"]), int(meta["id_bits"]), int(meta["vocab_size"])
    offsets = shard.offsets
    if offsets[0] != 0 or offsets[-1] != total or np.any(np.diff(offsets) <= 0):
        raise UserError(f"{where}: sequence offsets do not match the {total} input_ids")
    if len(shard.loss_mask) != total:
        raise UserError(f"{where}: loss_mask has {len(shard.loss_mask)} positions, input_ids has {total}")
    if shard.packed_ids.shape != (total, -(-k * bits // 8)):
        raise UserError(f"{where}: topk_ids has shape {shard.packed_ids.shape}, expected ({total}, {-(-k * bits // 8)})")
    if np.any(shard.input_ids < 0) or np.any(shard.input_ids >= vocab):
        raise UserError(f"{where}: input_ids outside the vocabulary (size {vocab})")
    ids = unpack_bits(shard.packed_ids, bits, k)
    if np.any(ids >= vocab):
        bad = int(np.argwhere(ids >= vocab)[0][0])
        raise UserError(f"{where}: position {bad} has a target id >= vocab size {vocab}")
    values = ValueCodec(meta["encoding"]).decode(shard.stored_values, k)
    if values.shape != (total, k):
        raise UserError(f"{where}: topk_values has shape {values.shape}, expected ({total}, {k})")
    broken = np.isnan(values) | (values == np.inf)  # -inf is a stored zero probability
    if np.any(broken):
        bad = int(np.argwhere(broken)[0][0])
        raise UserError(f"{where}: position {bad} has a NaN or infinite target value")
    if shard.tail_logp is not None:
        if shard.tail_logp.shape != (total,) or np.any(np.isnan(shard.tail_logp)) or np.any(shard.tail_logp > 1e-3):
            raise UserError(f"{where}: tail_logp must hold one log-probability <= 0 per position")
    if meta.get("values") == "logprobs" and np.any(values > 1e-3):
        raise UserError(f"{where}: stored log-probs must be <= 0")


def write_index(folder: Path, meta: dict[str, Any], shards: list[dict[str, Any]]) -> None:
    (folder / INDEX).write_text(json.dumps({**meta, "shards": shards}, indent=2) + "\n")


def read_index(folder: Path) -> dict[str, Any]:
    path = folder / INDEX
    if not path.is_file():
        raise UserError(f"{folder} holds no teacher logits ({INDEX} missing): is it a capture_logits entry?")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); the capture is damaged, run it again") from None
    required = ("format", "k", "encoding", "vocab_size", "id_bits", "data_fingerprint", "shards")
    missing = [key for key in required if not isinstance(index, dict) or key not in index]
    if missing:
        raise UserError(f"{path}: incomplete index, missing {', '.join(missing)}; the capture is damaged, run it again")
    for i, item in enumerate(index["shards"]):
        if not isinstance(item, dict) or "file" not in item or not (folder / str(item["file"])).is_file():
            raise UserError(f"{path}: shards.{i} names no file that exists in {folder}")
    return index


def shard_meta(**fields: Any) -> dict[str, Any]:
    meta = {"format": FORMAT, **fields}
    meta["id_bits"] = id_bits(int(meta["vocab_size"]))
    unknown = set(meta) - set(META_FIELDS)
    if unknown:
        raise ValueError(f"unknown shard metadata {sorted(unknown)}")
    return meta
