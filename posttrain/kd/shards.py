"""Teacher-logit shards: safetensors files (never pickle) whose header carries the metadata.

A shard holds whole sequences: `input_ids` [T] int32 and `offsets` [S+1] (sequence boundaries),
`loss_mask` [T] uint8 (1 on assistant tokens for chat data), `topk_ids` [T, ceil(k*bits/8)] uint8
(bit-packed ids), `topk_values` (fp16 [T, k], or packed codes) and, in shards written since it was
added, `tail_logp` [T] float32: the exact log of the teacher's mass outside the stored ids, taken
before the values were quantised (older shards without it stay readable). Position t's targets are
the teacher's distribution for token t+1, i.e. they pair with the student's logits at t.

Shards of the `compact` encoding (posttrain.kd.compact) hold instead `input_id_bits` and
`loss_mask_bits` (bit-packed), `targets` (one entropy-coded block per sequence, bounds in
`target_bounds` [S+1]), `target_tables` (the shard's frequency tables) and `tail_logp` as float16 (the
tail includes the mass of entries `mass` left out). Readers need no setting: the metadata says which.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.kd import compact
from posttrain.kd.packing import ValueCodec, id_bits, pack_bits, pack_fields, unpack_bits, unpack_fields
from posttrain.kd.rans import CorruptStream
from posttrain.core.errors import UserError

FORMAT = "posttrain-topk-v1"
INDEX = "index.json"
META_FIELDS = ("format", "teacher", "teacher_key", "tokenizer_hash", "vocab_size", "k", "encoding", "id_bits",
               "mode", "samples", "temperature", "chat_template_sha256", "data_fingerprint", "values",
               "special_tokens", "mass", "compact")
COMPACT = "compact"


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
        tail = self.tail_logp[start:end] if self.tail_logp is not None else None
        return _decode(self.meta, self.input_ids[start:end], self.loss_mask[start:end],
                       self.packed_ids[start:end], self.stored_values[start:end], tail)


def write_shard(path: Path, sequences: list[list[int]], loss_masks: list[list[int]], ids: np.ndarray,
                logp: np.ndarray, meta: dict[str, Any], tail_logp: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Write one shard atomically (tmp file + rename: a killed capture never leaves a torn shard).

    Returns the stored values as they decode ([T, k] in the given order; entries `mass` left out at
    -inf) and the stored tail, so a caller can measure what the encoding changed."""
    from safetensors.numpy import save_file

    lengths = [len(s) for s in sequences]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if ids.shape[0] != offsets[-1] or logp.shape != ids.shape:
        raise ValueError(f"targets for {ids.shape[0]} positions, sequences have {offsets[-1]}")
    if meta["encoding"] == COMPACT:
        tensors, stored, tail = _compact_tensors(lengths, sequences, loss_masks, ids, logp, meta, tail_logp)
    else:
        codec = ValueCodec(meta["encoding"])
        tensors = {
            "input_ids": np.concatenate([np.asarray(s, dtype=np.int32) for s in sequences]),
            "loss_mask": np.concatenate([np.asarray(m, dtype=np.uint8) for m in loss_masks]),
            "topk_ids": pack_bits(ids, int(meta["id_bits"])),  # converted chunk by chunk
            "topk_values": codec.encode(logp),
        }
        if tail_logp is not None:
            tensors["tail_logp"] = np.asarray(tail_logp, dtype=np.float32)
        stored, tail = codec.decode(tensors["topk_values"], logp.shape[-1]), tail_logp
    tensors["offsets"] = offsets
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={key: json.dumps(value) for key, value in meta.items()})
    os.replace(tmp, path)
    return stored, tail


def _compact_tensors(lengths, sequences, loss_masks, ids, logp, meta, tail_logp):
    if not np.all(np.isfinite(logp) | (logp == -np.inf)):
        raise ValueError("teacher log-probs contain NaN or +inf")
    encoded = compact.encode(lengths, ids, logp, meta.get("mass"))
    input_ids = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
    tensors = {
        "input_id_bits": pack_fields(input_ids, np.full(len(input_ids), int(meta["id_bits"]))),
        "loss_mask_bits": np.packbits(np.concatenate([np.asarray(m, dtype=bool) for m in loss_masks]),
                                      bitorder="little"),
        "targets": encoded.data, "target_bounds": encoded.bounds, "target_tables": encoded.tables,
    }
    tail = None
    if tail_logp is not None:
        # What `mass` leaves out moves to the tail, so the stored body and tail stay one distribution.
        tensors["tail_logp"] = np.logaddexp(np.asarray(tail_logp, dtype=np.float64), encoded.left_out).astype(np.float16)
        tail = tensors["tail_logp"].astype(np.float32)
    return tensors, encoded.stored, tail


REQUIRED = ("input_ids", "offsets", "loss_mask", "topk_ids", "topk_values")
REQUIRED_COMPACT = ("offsets", "input_id_bits", "loss_mask_bits", "targets", "target_bounds", "target_tables")
_TABLES: dict[tuple, Any] = {}  # a few shards' decoding tables (~2.6 MB each), not one per open shard


class LazyShard:
    """A shard read on demand. Opening reads the header and the sequence offsets only and checks the
    shapes; each sequence's slices are read (memory-mapped) when asked for, and their contents checked
    then. Memory does not depend on the size or number of shards."""

    def __init__(self, path: Path, expect: dict[str, Any] | None = None):
        from safetensors import safe_open

        self.path = Path(path)
        self.where = f"teacher-logit shard {self.path}"
        try:
            with safe_open(str(self.path), framework="numpy") as handle:
                raw_meta = handle.metadata() or {}
                shapes = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
                offsets = handle.get_tensor("offsets") if "offsets" in shapes else None
        except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
            raise UserError(f"{self.where} is unreadable (truncated or not safetensors): {exc}") from exc
        try:
            self.meta = {key: json.loads(value) for key, value in raw_meta.items()}
        except ValueError as exc:
            raise UserError(f"{self.where}: metadata is not valid JSON ({exc})") from exc
        self.compact = self.meta.get("encoding") == COMPACT
        missing = [n for n in (REQUIRED_COMPACT if self.compact else REQUIRED) if n not in shapes]
        if missing or self.meta.get("format") != FORMAT:
            raise UserError(f"{self.where}: not a {FORMAT} shard (missing {missing or 'format tag'})")
        self.offsets, self.has_tail = offsets, "tail_logp" in shapes
        if self.compact:
            self.bounds = self._tensor("target_bounds")
            _check_compact_header(self.where, self.meta, expect or {}, shapes, offsets, self.bounds)
        else:
            _check_header(self.where, self.meta, expect or {}, shapes, offsets)

    def _tensor(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="numpy") as handle:
                return handle.get_tensor(name)
        except Exception as exc:  # noqa: BLE001 - the file changed or broke since it was opened
            raise UserError(f"{self.where} is unreadable (truncated or not safetensors): {exc}") from exc

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int64)

    def sequence(self, index: int) -> dict[str, np.ndarray]:
        return self.sequences(index, index + 1)[0]

    def sequences(self, first: int, last: int) -> list[dict[str, np.ndarray]]:
        """Sequences [first, last), read and checked (compact ones decoded together: faster per token)."""
        from safetensors import safe_open

        start, end = int(self.offsets[first]), int(self.offsets[last])
        if self.compact:
            return self._compact_sequences(first, last)
        names = [*REQUIRED[:1], *REQUIRED[2:], *(["tail_logp"] if self.has_tail else [])]
        try:
            with safe_open(str(self.path), framework="numpy") as handle:
                part = {name: handle.get_slice(name)[start:end] for name in names}
        except Exception as exc:  # noqa: BLE001 - the file changed or broke since it was opened
            raise UserError(f"{self.where} is unreadable (truncated or not safetensors): {exc}") from exc
        rows = []
        for index in range(first, last):
            a, b = int(self.offsets[index]) - start, int(self.offsets[index + 1]) - start
            tail = part["tail_logp"][a:b] if self.has_tail else None
            row = _decode(self.meta, part["input_ids"][a:b], part["loss_mask"][a:b], part["topk_ids"][a:b],
                          part["topk_values"][a:b], tail)
            _check_rows(f"{self.where}, sequence {index + 1}", self.meta, row, first_position=a + start)
            rows.append(row)
        return rows

    def _tables(self):
        stat = self.path.stat()
        key = (str(self.path), stat.st_size, stat.st_mtime_ns)
        if key not in _TABLES:
            if len(_TABLES) >= 4:
                _TABLES.pop(next(iter(_TABLES)))
            try:
                _TABLES[key] = compact.decode_tables(self._tensor("target_tables"))
            except CorruptStream as exc:
                raise UserError(f"{self.where}: {exc}") from None
        return _TABLES[key]

    def _compact_sequences(self, first: int, last: int) -> list[dict[str, np.ndarray]]:
        from safetensors import safe_open

        start, end = int(self.offsets[first]), int(self.offsets[last])
        bits = int(self.meta["id_bits"])
        where = f"{self.where}, sequences {first + 1} to {last}" if last - first > 1 else f"{self.where}, sequence {first + 1}"
        try:
            with safe_open(str(self.path), framework="numpy") as handle:
                id_bytes = handle.get_slice("input_id_bits")[start * bits // 8: -(-end * bits // 8)]
                mask_bytes = handle.get_slice("loss_mask_bits")[start // 8: -(-end // 8)]
                blocks = handle.get_slice("targets")[int(self.bounds[first]):int(self.bounds[last])]
                tail = handle.get_slice("tail_logp")[start:end] if self.has_tail else None
        except Exception as exc:  # noqa: BLE001 - the file changed or broke since it was opened
            raise UserError(f"{self.where} is unreadable (truncated or not safetensors): {exc}") from exc
        lengths = self.lengths()[first:last]
        input_ids = unpack_fields(id_bytes, np.full(end - start, bits), first_bit=start * bits % 8)
        mask = np.unpackbits(mask_bytes, bitorder="little")[start % 8: start % 8 + end - start].astype(bool)
        cuts = self.bounds[first:last + 1] - self.bounds[first]
        try:
            ids, values = compact.decode([blocks[cuts[i]:cuts[i + 1]] for i in range(last - first)], lengths,
                                         self._tables(), int(self.meta["k"]), self.meta.get("compact"))
        except CorruptStream as exc:
            raise UserError(f"{where}: {exc}") from None
        rows, edges = [], np.concatenate([[0], np.cumsum(lengths)])
        for i in range(last - first):
            a, b = int(edges[i]), int(edges[i + 1])
            row = {"input_ids": input_ids[a:b], "loss_mask": mask[a:b], "target_ids": ids[a:b],
                   "target_values": values[a:b]}
            if tail is not None:
                row["target_tail"] = tail[a:b].astype(np.float32)
            _check_rows(f"{self.where}, sequence {first + i + 1}", self.meta, row, first_position=start + a)
            rows.append(row)
        return rows

    def validate(self, positions: int = 16384) -> None:
        """Check every sequence, about `positions` at a time (bounded memory). Compact shards are checked by
        their blocks' checksums and tables (what was written was checked while it was coded), others by
        reading every sequence."""
        first = 0
        while first < self.num_sequences:
            last = int(np.searchsorted(self.offsets, self.offsets[first] + positions, side="right")) - 1
            last = min(max(last, first + 1), self.num_sequences)
            if self.compact:
                self._check_blocks(first, last)
            else:
                self.sequences(first, last)
            first = last
        if self.compact:
            self._tables()

    def _check_blocks(self, first: int, last: int) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="numpy") as handle:
                blocks = handle.get_slice("targets")[int(self.bounds[first]):int(self.bounds[last])]
        except Exception as exc:  # noqa: BLE001 - the file changed or broke since it was opened
            raise UserError(f"{self.where} is unreadable (truncated or not safetensors): {exc}") from exc
        cuts = self.bounds[first:last + 1] - self.bounds[first]
        for index in range(last - first):
            try:
                compact.check_block(blocks[cuts[index]:cuts[index + 1]])
            except CorruptStream as exc:
                raise UserError(f"{self.where}, sequence {first + index + 1}: {exc}") from None


def read_shard(path: Path, expect: dict[str, Any] | None = None) -> Shard | LazyShard:
    """Load a whole shard and validate all of it; every problem is a UserError naming the file. A compact
    shard is checked piece by piece and returned lazy (its sequences are decoded when asked for)."""
    from safetensors import safe_open

    lazy = LazyShard(path, expect)  # header, offsets and shapes first
    if lazy.compact:
        lazy.validate()
        return lazy
    try:
        with safe_open(str(path), framework="numpy") as handle:
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise UserError(f"teacher-logit shard {path} is unreadable (truncated or not safetensors): {exc}") from exc
    shard = Shard(Path(path), lazy.meta, arrays["input_ids"], arrays["offsets"], arrays["loss_mask"],
                  arrays["topk_ids"], arrays["topk_values"], arrays.get("tail_logp"))
    validate_shard(shard, expect or {})
    return shard


def _decode(meta, input_ids, loss_mask, packed_ids, stored_values, tail) -> dict[str, np.ndarray]:
    k = int(meta["k"])
    row = {"input_ids": input_ids.astype(np.int64), "loss_mask": loss_mask.astype(bool),
           "target_ids": unpack_bits(packed_ids, int(meta["id_bits"]), k),
           "target_values": ValueCodec(meta["encoding"]).decode(stored_values, k)}
    if tail is not None:
        row["target_tail"] = tail.astype(np.float32)
    return row


def _check_header(where: str, meta: dict, expect: dict, shapes: dict[str, list[int]], offsets) -> None:
    for key, value in expect.items():
        if meta.get(key) != value:
            raise UserError(f"{where}: {key} is {meta.get(key)!r}, the index says {value!r}")
    total = shapes["input_ids"][0] if shapes["input_ids"] else 0
    k, bits = int(meta["k"]), int(meta["id_bits"])
    if offsets is None or offsets[0] != 0 or offsets[-1] != total or np.any(np.diff(offsets) <= 0):
        raise UserError(f"{where}: sequence offsets do not match the {total} input_ids")
    if shapes["loss_mask"] != [total]:
        raise UserError(f"{where}: loss_mask has {shapes['loss_mask']} positions, input_ids has {total}")
    if shapes["topk_ids"] != [total, -(-k * bits // 8)]:
        raise UserError(f"{where}: topk_ids has shape {tuple(shapes['topk_ids'])}, expected ({total}, {-(-k * bits // 8)})")
    if shapes["topk_values"][:1] != [total]:
        raise UserError(f"{where}: topk_values has {shapes['topk_values'][:1]} positions, input_ids has {total}")
    if "tail_logp" in shapes and shapes["tail_logp"] != [total]:
        raise UserError(f"{where}: tail_logp must hold one log-probability per position")


def _check_compact_header(where: str, meta: dict, expect: dict, shapes: dict[str, list[int]], offsets,
                          bounds) -> None:
    for key, value in expect.items():
        if meta.get(key) != value:
            raise UserError(f"{where}: {key} is {meta.get(key)!r}, the index says {value!r}")
    if offsets is None or len(offsets) < 2 or offsets[0] != 0 or np.any(np.diff(offsets) <= 0):
        raise UserError(f"{where}: sequence offsets are not increasing from 0")
    total, bits = int(offsets[-1]), int(meta["id_bits"])
    expected = {"input_id_bits": [-(-total * bits // 8)], "loss_mask_bits": [-(-total // 8)],
                "target_bounds": [len(offsets)], **({"tail_logp": [total]} if "tail_logp" in shapes else {})}
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise UserError(f"{where}: {name} has shape {shapes[name]}, expected {shape} for {total} positions")
    if bounds[0] != 0 or np.any(np.diff(bounds) < compact.HEADER) or bounds[-1] != shapes["targets"][0]:
        raise UserError(f"{where}: target_bounds do not match the {shapes['targets'][0]} bytes of targets")
    if meta.get("mode") != "topk":
        raise UserError(f"{where}: the compact encoding stores top-k targets only")


def _check_rows(where: str, meta: dict, row: dict[str, np.ndarray], first_position: int = 0) -> None:
    vocab, k = int(meta["vocab_size"]), int(meta["k"])
    if np.any(row["input_ids"] < 0) or np.any(row["input_ids"] >= vocab):
        raise UserError(f"{where}: input_ids outside the vocabulary (size {vocab})")
    ids, values = row["target_ids"], row["target_values"]
    outside = (ids >= vocab) | (ids < 0)
    if np.any(outside):
        bad = first_position + int(np.argwhere(outside)[0][0])
        raise UserError(f"{where}: position {bad} has a target id outside the vocabulary (size {vocab})")
    if values.shape != ids.shape or values.shape[-1:] != (k,):
        raise UserError(f"{where}: topk_values has shape {values.shape}, expected {ids.shape}")
    broken = np.isnan(values) | (values == np.inf)  # -inf is a stored zero probability
    if np.any(broken):
        bad = first_position + int(np.argwhere(broken)[0][0])
        raise UserError(f"{where}: position {bad} has a NaN or infinite target value")
    tail = row.get("target_tail")
    if tail is not None and (np.any(np.isnan(tail)) or np.any(tail > 1e-3)):
        raise UserError(f"{where}: tail_logp must hold one log-probability <= 0 per position")
    if meta.get("values") == "logprobs" and np.any(values > 1e-3):
        raise UserError(f"{where}: stored log-probs must be <= 0")


def validate_shard(shard: Shard, expect: dict[str, Any]) -> None:
    """Every check of a whole shard (header and contents), in bounded pieces of sequences."""
    where = f"teacher-logit shard {shard.path}"
    shapes = {"input_ids": list(shard.input_ids.shape), "loss_mask": list(shard.loss_mask.shape),
              "topk_ids": list(shard.packed_ids.shape), "topk_values": [len(shard.stored_values)],
              **({"tail_logp": list(shard.tail_logp.shape)} if shard.tail_logp is not None else {})}
    _check_header(where, shard.meta, expect, shapes, shard.offsets)
    step = 4096  # positions per check: unpacking is bounded, whatever the shard size
    for start in range(0, len(shard.input_ids), step):
        end = start + step
        tail = shard.tail_logp[start:end] if shard.tail_logp is not None else None
        row = _decode(shard.meta, shard.input_ids[start:end], shard.loss_mask[start:end],
                      shard.packed_ids[start:end], shard.stored_values[start:end], tail)
        _check_rows(where, shard.meta, row, first_position=start)


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
