"""Bit-packing of token ids and quantisation of log-probs for stored teacher top-k targets.

Ids take ceil(log2 V) bits each (17 for Llama-3's 128256) instead of 32. Values are the teacher's
full-vocabulary log-probs (so the tail mass 1 - sum p_topk is recoverable), stored as fp16 or as
unsigned codes of `bits` bits: code = round(-logp / step). The largest code means "below the range":
it decodes to -inf (probability 0, its mass counted in the tail), never to a clipped value that
would overstate it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# name -> (bits, step in nats). Mean absolute error of uniform rounding is about step / 4.
QUANTISED = {"q8": (8, 1 / 16), "q10": (10, 1 / 32), "q12": (12, 1 / 128)}
ENCODINGS = ("fp16", *QUANTISED)


def id_bits(vocab_size: int) -> int:
    return max(1, math.ceil(math.log2(vocab_size)))


CHUNK_ROWS = 256  # rows packed or unpacked at a time: ~0.6 KB of scratch per row whatever the input (and faster than big chunks: they fit the cache)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """[..., k] unsigned ints < 2**bits -> [..., ceil(k*bits/8)] uint8 (little-endian bit order)."""
    values = np.asarray(values)
    k = values.shape[-1]
    flat = values.reshape(-1, k)
    out = np.empty((len(flat), -(-k * bits // 8)), dtype=np.uint8)
    shifts = np.arange(bits, dtype=np.uint32 if bits <= 32 else np.uint64)
    for start in range(0, len(flat), CHUNK_ROWS):
        part = flat[start:start + CHUNK_ROWS].astype(shifts.dtype)
        bit_array = ((part[..., None] >> shifts) & 1).astype(np.uint8)  # [rows, k, bits]
        out[start:start + CHUNK_ROWS] = np.packbits(bit_array.reshape(len(part), k * bits), axis=-1,
                                                    bitorder="little")
    return out.reshape(*values.shape[:-1], out.shape[-1])


def unpack_bits(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of pack_bits: [..., ceil(k*bits/8)] uint8 -> [..., k] int64."""
    packed = np.asarray(packed)
    flat = packed.reshape(-1, packed.shape[-1])
    out = np.empty((len(flat), k), dtype=np.int64)
    weights = (np.int64(1) << np.arange(bits, dtype=np.int64))
    for start in range(0, len(flat), CHUNK_ROWS):
        part = flat[start:start + CHUNK_ROWS]
        bit_array = np.unpackbits(part, axis=-1, count=k * bits, bitorder="little").reshape(len(part), k, bits)
        out[start:start + CHUNK_ROWS] = bit_array @ weights
    return out.reshape(*packed.shape[:-1], k)


@dataclass(frozen=True)
class ValueCodec:
    encoding: str

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown value encoding {self.encoding!r}; one of {', '.join(ENCODINGS)}")

    def encode(self, logp: np.ndarray) -> np.ndarray:
        """[..., k] float log-probs -> stored array (fp16, or packed uint8 codes), CHUNK_ROWS rows at a time."""
        if self.encoding == "fp16":
            return np.asarray(logp, dtype=np.float16)
        bits, step = QUANTISED[self.encoding]
        logp = np.asarray(logp)
        flat = logp.reshape(-1, logp.shape[-1])
        out = np.empty((len(flat), -(-flat.shape[-1] * bits // 8)), dtype=np.uint8)
        for start in range(0, len(flat), CHUNK_ROWS):
            negated = -flat[start:start + CHUNK_ROWS].astype(np.float64)
            codes = np.clip(np.rint(negated / step), 0, 2 ** bits - 1)
            out[start:start + CHUNK_ROWS] = pack_bits(codes.astype(np.uint64), bits)
        return out.reshape(*logp.shape[:-1], out.shape[-1])

    def decode(self, stored: np.ndarray, k: int) -> np.ndarray:
        """Stored array -> [..., k] float32 log-probs, CHUNK_ROWS rows at a time."""
        if self.encoding == "fp16":
            return np.asarray(stored, dtype=np.float32)
        bits, step = QUANTISED[self.encoding]
        stored = np.asarray(stored)
        flat = stored.reshape(-1, stored.shape[-1])
        out = np.empty((len(flat), k), dtype=np.float32)
        for start in range(0, len(flat), CHUNK_ROWS):
            codes = unpack_bits(flat[start:start + CHUNK_ROWS], bits, k)
            values = (-codes * step).astype(np.float32)
            values[codes == 2 ** bits - 1] = -np.inf
            out[start:start + CHUNK_ROWS] = values
        return out.reshape(*stored.shape[:-1], k)


def bytes_per_token(vocab_size: int, k: int, encoding: str) -> float:
    """Storage of one position's targets (ids + values), excluding the shared input ids."""
    return math.ceil(k * id_bits(vocab_size) / 8) + (
        2 * k if encoding == "fp16" else math.ceil(k * QUANTISED[encoding][0] / 8))


def pack_fields(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Unsigned fields of varying widths (each <= 32 bits) written back to back, little-endian bit order,
    into ceil(sum(lengths) / 8) bytes. Fields are disjoint, so adding them into 64-bit words is OR."""
    values = np.asarray(values, dtype=np.uint64).ravel()
    lengths = np.asarray(lengths, dtype=np.int64).ravel()
    total = int(lengths.sum())
    words = np.zeros(total // 64 + 2, dtype=np.uint64)
    if total:
        starts = np.cumsum(lengths) - lengths
        kept = lengths > 0
        values = values[kept] & ((np.uint64(1) << lengths[kept].astype(np.uint64)) - np.uint64(1))
        starts = starts[kept]
        word, shift = starts >> 6, (starts & 63).astype(np.uint64)
        np.add.at(words, word, values << shift)
        spill = shift > 0  # the part that crosses into the next word (a shift by 64 would be undefined)
        np.add.at(words, word[spill] + 1, values[spill] >> (np.uint64(64) - shift[spill]))
    return words.astype("<u8").view(np.uint8)[: -(-total // 8)]


def unpack_fields(data: np.ndarray, lengths: np.ndarray, first_bit: int = 0) -> np.ndarray:
    """Inverse of pack_fields: the fields of `lengths` (each <= 32 bits) starting at bit `first_bit` of
    `data` -> int64 values. Reading past the end of `data` is an error, not garbage."""
    lengths = np.asarray(lengths, dtype=np.int64).ravel()
    starts = first_bit + np.cumsum(lengths) - lengths
    if len(lengths) and int(starts[-1] + lengths[-1]) > 8 * len(data):
        raise ValueError("bit fields run past the end of their data")
    padded = np.concatenate([np.asarray(data, dtype=np.uint8).ravel(), np.zeros(8, np.uint8)])
    # Each field sits inside the 8 bytes from its first byte (shift <= 7, width <= 32).
    windows = np.ndarray(shape=(max(len(padded) - 7, 0),), dtype="<u8", buffer=padded, strides=(1,))
    byte, shift = starts >> 3, (starts & 7).astype(np.uint64)
    raw = windows[byte] >> shift
    return (raw & ((np.uint64(1) << lengths.astype(np.uint64)) - np.uint64(1))).astype(np.int64)
