"""The `compact` encoding of teacher top-k targets: entropy-coded sorted ids and quantised log-probs.

Per position, the stored entries (the top k, or with `mass` the fewest best ones whose probabilities
reach that share of the teacher's distribution) are sorted by token id and coded as:
- the entry count (when variable) and the position's reference code: the lowest stored value, quantised
  at STEP nats (codes are -log p / STEP rounded; the largest code means "below the range", -inf);
- per entry, the id gap to the previous stored id as an Elias-gamma-like symbol (exponent and top
  mantissa bit, entropy coded) plus the remaining mantissa bits verbatim, and the value as its code's
  distance above the reference (delta coding), entropy coded; rare large distances escape to 13 bits.
Symbols are rANS-coded (posttrain.kd.rans) with static frequency tables fitted to each shard, one table
per symbol kind and, for gaps and values, per sixteenth of the position's sorted entries (low ids are
dense and likely, high ids sparse): mean absolute log-prob error is about STEP / 4 = 0.0096 nats.

A position's coded symbols go to one lane of LANE_TOKENS consecutive positions; each sequence is its own
stream (read on its own), its lanes decoded side by side. Why this layout: ids sorted by value would
cost a permutation (~37 B/token at k = 64) that sorted ids avoid, and a static, per-shard model keeps
decoding a few array operations per symbol step over all lanes at once.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from posttrain.kd import rans
from posttrain.kd.packing import pack_fields, unpack_fields

STEP = 1 / 26
MAX_CODE = (1 << 13) - 1  # "below the range": decodes to -inf (probability 0, counted in the tail)
LANE_TOKENS = 8
BUCKETS = 16
ESCAPE = 255
ESCAPE_BITS = 13  # an escaped distance's remainder above ESCAPE (codes have 13 bits)
DECODE_CHUNK = 128  # positions turned from symbols into ids and values at a time (bounded scratch)
MAX_K = 1 << 13

# Context rows of the frequency tables (row 0 is rANS's null context).
COUNT_HI, COUNT_LO, REF_HI, REF_LO = 1, 2, 3, 4
GAP = 5
VALUE = GAP + BUCKETS
CONTEXTS = VALUE + BUCKETS
GROUP_TOKENS = 4096  # positions coded at once (~15 KB each while coding): bounded, whatever the shard size


def parameters() -> dict[str, Any]:
    """What a reader needs to decode; stored in each shard's metadata."""
    return {"version": 1, "step": STEP, "max_code": MAX_CODE, "lane_tokens": LANE_TOKENS, "buckets": BUCKETS}


def select_entries(logp: np.ndarray, mass: float | None) -> np.ndarray:
    """Entries kept per position [n] (values best first): all k, or the fewest whose probabilities sum
    to at least `mass` of the teacher's whole distribution (at most k)."""
    n, k = logp.shape
    if mass is None:
        return np.full(n, k, dtype=np.int64)
    covered = np.cumsum(np.exp(logp.astype(np.float64)), axis=1)
    return np.minimum((covered < mass).sum(1) + 1, k).astype(np.int64)


def quantise(logp: np.ndarray) -> np.ndarray:
    codes = np.rint(-np.asarray(logp, dtype=np.float64) / STEP)
    return np.clip(np.nan_to_num(codes, posinf=MAX_CODE), 0, MAX_CODE).astype(np.int64)


def dequantise(codes: np.ndarray) -> np.ndarray:
    values = (-codes * STEP).astype(np.float32)
    values[codes >= MAX_CODE] = -np.inf
    return values


@dataclass
class Entries:
    """One group of positions' stored entries, flat in (position, id) order."""
    counts: np.ndarray   # [n] entries per position
    ids: np.ndarray      # [E] ascending within each position
    codes: np.ndarray    # [E]

    @property
    def reference(self) -> np.ndarray:
        """Per position, the largest code (the lowest stored value)."""
        starts = np.cumsum(self.counts) - self.counts
        return np.maximum.reduceat(self.codes, starts) if len(self.codes) else np.zeros(0, np.int64)


def sorted_entries(ids: np.ndarray, logp: np.ndarray, counts: np.ndarray) -> Entries:
    """Keep each position's `counts` best entries, sorted by id."""
    n, k = ids.shape
    best_first = np.argsort(-np.where(np.isnan(logp), -np.inf, logp), axis=1, kind="stable")
    ids = np.take_along_axis(ids.astype(np.int64), best_first, 1)
    codes = quantise(np.take_along_axis(logp, best_first, 1))
    kept = np.arange(k)[None, :] < counts[:, None]
    big = np.iinfo(np.int64).max
    by_id = np.argsort(np.where(kept, ids, big), axis=1, kind="stable")
    ids, codes = np.take_along_axis(ids, by_id, 1), np.take_along_axis(codes, by_id, 1)
    kept = np.take_along_axis(kept, by_id, 1)
    return Entries(counts, ids[kept], codes[kept])


def _gap_symbols(gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gap >= 1 -> (symbol, raw bits, raw length): exponent e and the bit below the top one make the
    symbol, the e - 1 lower bits are raw."""
    exponent = np.floor(np.log2(gaps)).astype(np.int64)
    exponent = exponent - ((1 << exponent) > gaps) + ((1 << (exponent + 1)) <= gaps)  # exact for big ids
    top = np.where(exponent > 0, (gaps >> np.maximum(exponent - 1, 0)) & 1, 0)
    symbol = np.where(exponent > 0, 2 * exponent - 1 + top, 0)
    length = np.maximum(exponent - 1, 0)
    return symbol, gaps & ((1 << length) - 1), length


def _gaps_from(symbol: np.ndarray, raw: np.ndarray) -> np.ndarray:
    exponent = (symbol + 1) >> 1
    top = (symbol + 1) & 1
    return np.where(symbol == 0, 1, (1 << exponent) | (top << np.maximum(exponent - 1, 0)) | raw)


def _gap_raw_length(symbol: np.ndarray) -> np.ndarray:
    return np.maximum(((symbol + 1) >> 1) - 1, 0)


@dataclass
class Layout:
    """Where each position's symbols go: lanes of LANE_TOKENS positions, per-stream (sequence) lanes."""
    lane_of_position: np.ndarray
    lane_stream: np.ndarray
    slot_in_lane: np.ndarray  # position's index within its lane

    @classmethod
    def of(cls, lengths: np.ndarray, lane_tokens: int) -> "Layout":
        lengths = np.asarray(lengths, dtype=np.int64)
        lanes_per = -(-lengths // lane_tokens)
        lane_start = np.cumsum(lanes_per) - lanes_per
        stream_of_position = np.repeat(np.arange(len(lengths)), lengths)
        within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        lane = lane_start[stream_of_position] + within // lane_tokens
        return cls(lane, np.repeat(np.arange(len(lengths)), lanes_per), within % lane_tokens)

    @property
    def lanes(self) -> int:
        return len(self.lane_stream)


def _count_grid(layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """(step, lane) of each position's two count symbols: lane-major positions, 2 steps each."""
    step = 2 * layout.slot_in_lane
    return step, layout.lane_of_position


def _position_steps(layout: Layout, counts: np.ndarray) -> tuple[np.ndarray, int]:
    """Second phase: per position 2 reference symbols then (gap, value) per entry, positions one after
    another in their lane. Returns each position's first step and the number of steps."""
    cost = 2 + 2 * counts
    ends = np.cumsum(cost)
    lane_first = np.searchsorted(layout.lane_of_position, np.arange(layout.lanes))  # positions are lane-ordered
    start = ends - cost - np.concatenate([[0], ends])[lane_first][layout.lane_of_position]
    return start, int((start + cost).max()) if len(counts) else 0


@dataclass
class GroupSymbols:
    """Every symbol of a group of positions, with its context, in the grids rANS codes."""
    symbols: np.ndarray   # [steps, lanes]
    contexts: np.ndarray  # [steps, lanes]
    raw_values: list[np.ndarray]   # per stream
    raw_lengths: list[np.ndarray]  # per stream


def symbolise(entries: Entries, lengths: np.ndarray) -> GroupSymbols:
    counts, lane_tokens = entries.counts, LANE_TOKENS
    if np.any(counts < 1) or np.any(counts > MAX_K):
        raise ValueError(f"the compact encoding stores 1 to {MAX_K} entries per position")
    layout = Layout.of(lengths, lane_tokens)
    reference = entries.reference
    starts = np.cumsum(counts) - counts
    previous = np.concatenate([[-1], entries.ids[:-1]])
    previous[starts] = -1
    gaps = entries.ids - previous
    if np.any(gaps < 1):
        raise ValueError("a position stores the same id twice; the compact encoding needs distinct top-k ids")
    gap_symbol, gap_raw, gap_length = _gap_symbols(gaps)
    distance = np.repeat(reference, counts) - entries.codes
    value_symbol = np.minimum(distance, ESCAPE)
    escaped = distance >= ESCAPE
    first_step, entry_steps = _position_steps(layout, counts)
    position, j = _entries_of(counts, 0, len(counts))
    gap_step, entry_lane = first_step[position] + 2 + 2 * j, layout.lane_of_position[position]
    count_steps = 2 * lane_tokens
    symbols = np.zeros((count_steps + entry_steps, layout.lanes), dtype=np.uint8)
    contexts = np.zeros_like(symbols)
    step, lane = _count_grid(layout)
    symbols[step, lane], contexts[step, lane] = (counts - 1) >> 6, COUNT_HI
    symbols[step + 1, lane], contexts[step + 1, lane] = (counts - 1) & 63, COUNT_LO
    step = count_steps + first_step
    symbols[step, lane], contexts[step, lane] = reference >> 5, REF_HI
    symbols[step + 1, lane], contexts[step + 1, lane] = reference & 31, REF_LO
    bucket = (j * BUCKETS) // counts[position]
    step = count_steps + gap_step
    symbols[step, entry_lane], contexts[step, entry_lane] = gap_symbol, GAP + bucket
    symbols[step + 1, entry_lane], contexts[step + 1, entry_lane] = value_symbol, VALUE + bucket
    # Raw bits per stream, entry by entry: the gap's low mantissa bits, then the escaped distance if any.
    stream_of_entry = np.repeat(layout.lane_stream[layout.lane_of_position], counts)
    fields = np.stack([gap_raw, np.where(escaped, distance - ESCAPE, 0)], 1)
    widths = np.stack([gap_length, np.where(escaped, ESCAPE_BITS, 0)], 1)
    bounds = np.searchsorted(stream_of_entry, np.arange(len(lengths) + 1))
    raw_values = [fields[bounds[i]:bounds[i + 1]].ravel() for i in range(len(lengths))]
    raw_lengths = [widths[bounds[i]:bounds[i + 1]].ravel() for i in range(len(lengths))]
    return GroupSymbols(symbols, contexts, raw_values, raw_lengths)


def count_symbols(groups: list[GroupSymbols]) -> np.ndarray:
    counts = np.zeros((CONTEXTS, 256), dtype=np.int64)
    for group in groups:
        np.add.at(counts, (group.contexts.ravel(), group.symbols.ravel()), 1)
    return counts


def encode_group(group: GroupSymbols, tables: rans.Tables, streams: int, lane_stream: np.ndarray) -> list[bytes]:
    """One coded block per stream: [uint32 CRC-32 of the rest][uint32 word count][rANS words][raw bits].
    The checksum makes any damage an error (a flipped raw mantissa bit would otherwise be a silently
    wrong id) and lets a resumed capture check a finished shard without decoding it."""
    words = rans.encode(group.symbols, group.contexts, tables, lane_stream, streams)
    blocks = []
    for stream in range(streams):
        raw = pack_fields(group.raw_values[stream], group.raw_lengths[stream])
        body = np.uint32(len(words[stream])).tobytes() + words[stream].astype("<u2").tobytes() + raw.tobytes()
        blocks.append(np.uint32(zlib.crc32(body)).tobytes() + body)
    return blocks


HEADER = 8  # bytes before a block's words: checksum and word count


def check_block(block: np.ndarray) -> None:
    """Raise CorruptStream unless the block is as it was written."""
    block = np.asarray(block, dtype=np.uint8)
    if len(block) < HEADER or int(block[:4].view("<u4")[0]) != zlib.crc32(block[4:].tobytes()):
        raise rans.CorruptStream("checksum mismatch: the coded targets were damaged after they were written")


def encode_tables(freq: np.ndarray) -> np.ndarray:
    return np.frombuffer(zlib.compress(freq.astype("<u2").tobytes(), 9), dtype=np.uint8).copy()


def decode_tables(stored: np.ndarray) -> rans.Tables:
    try:
        raw = zlib.decompress(np.asarray(stored, dtype=np.uint8).tobytes())
    except zlib.error as exc:
        raise rans.CorruptStream(f"frequency tables are damaged ({exc})") from None
    freq = np.frombuffer(raw, dtype="<u2").astype(np.int64)
    if len(freq) != CONTEXTS * 256:
        raise rans.CorruptStream("frequency tables have the wrong size")
    return rans.Tables(freq.reshape(CONTEXTS, 256))


@dataclass
class Encoded:
    data: np.ndarray       # uint8: one coded block per sequence
    bounds: np.ndarray     # [S+1] byte offsets of the blocks
    tables: np.ndarray     # uint8: the frequency tables (encode_tables)
    counts: np.ndarray     # [T] entries kept per position
    stored: np.ndarray     # [T, k] the log-probs as they decode, in the input's order; left out: -inf
    left_out: np.ndarray   # [T] log of the mass `mass` left out (-inf where none)


def encode(lengths: list[int], ids: np.ndarray, logp: np.ndarray, mass: float | None) -> Encoded:
    """Sequences of `lengths` positions with targets ids/logp [T, k] (any order), coded.

    Works on groups of whole sequences of about GROUP_TOKENS positions, each symbolised twice (once to
    count, once to code): transient memory depends on the group, not on the number of positions."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    offsets = np.concatenate([[0], ends])
    groups, first = [], 0
    for index in range(len(lengths)):
        if ends[index] - offsets[first] >= GROUP_TOKENS or index == len(lengths) - 1:
            groups.append((first, index + 1))
            first = index + 1
    total, k = logp.shape
    counts = np.empty(total, dtype=np.int64)
    stored = np.empty((total, k), dtype=np.float32)
    left_out = np.empty(total, dtype=np.float64)
    for first, last in groups:
        rows = slice(int(offsets[first]), int(offsets[last]))
        part = logp[rows].astype(np.float64)
        best_first = np.argsort(-part, axis=1, kind="stable")
        counts[rows] = select_entries(np.take_along_axis(part, best_first, 1), mass)
        dropped = np.argsort(best_first, axis=1) >= counts[rows][:, None]  # rank among the entries >= count
        stored[rows] = np.where(dropped, -np.inf, dequantise(quantise(part)))
        left_out[rows] = np.logaddexp.reduce(np.where(dropped, part, -np.inf), axis=1)

    def group_symbols(first: int, last: int) -> GroupSymbols:
        rows = slice(int(offsets[first]), int(offsets[last]))
        return symbolise(sorted_entries(ids[rows], logp[rows], counts[rows]), lengths[first:last])

    frequencies = np.zeros((CONTEXTS, 256), dtype=np.int64)
    for first, last in groups:
        frequencies += count_symbols([group_symbols(first, last)])
    tables = rans.Tables(rans.normalise(frequencies))
    blocks: list[bytes] = []
    for first, last in groups:
        group = group_symbols(first, last)
        lanes_per = -(-lengths[first:last] // LANE_TOKENS)
        blocks += encode_group(group, tables, last - first, np.repeat(np.arange(last - first), lanes_per))
    bounds = np.concatenate([[0], np.cumsum([len(b) for b in blocks])]).astype(np.int64)
    data = np.frombuffer(b"".join(blocks), dtype=np.uint8).copy()
    return Encoded(data, bounds, encode_tables(tables.freq), counts, stored, left_out)


def decode(blocks: list[np.ndarray], lengths: np.ndarray, tables: rans.Tables, k: int,
           params: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Coded blocks of sequences (one uint8 array each) with `lengths` positions -> ids [T, k] int64 and
    log-probs [T, k] float32, in id order; positions with fewer entries are padded with their first id
    repeated at -inf (a repeat is ignored by the losses). Raises rans.CorruptStream on damaged data."""
    params = params or parameters()
    if params != parameters():
        raise rans.CorruptStream(f"compact parameters {params} are not ones this version reads")
    lengths = np.asarray(lengths, dtype=np.int64)
    layout = Layout.of(lengths, LANE_TOKENS)
    words, raws, bounds = [], [], [0]
    for block in blocks:
        block = np.asarray(block, dtype=np.uint8)
        check_block(block)
        count = int(block[4:HEADER].view("<u4")[0])
        if HEADER + 2 * count > len(block):
            raise rans.CorruptStream("a coded block is shorter than its word count")
        words.append(block[HEADER:HEADER + 2 * count].view("<u2"))
        raws.append(block[HEADER + 2 * count:])
        bounds.append(bounds[-1] + count)
    decoder = rans.Decoder(np.concatenate(words) if words else np.zeros(0, np.uint16), np.asarray(bounds),
                           tables, layout.lane_stream)
    step, lane = _count_grid(layout)
    only = [np.flatnonzero(tables.freq[row] == rans.TOTAL) for row in (COUNT_HI, COUNT_LO)]
    if all(len(symbol) for symbol in only):
        # One count for every position (plain top-k): its symbols carry no bits and move no state.
        counts = np.full(len(lane), (int(only[0][0]) << 6 | int(only[1][0])) + 1, dtype=np.int64)
    else:
        count_contexts = np.zeros((2 * LANE_TOKENS, layout.lanes), dtype=np.uint8)
        count_contexts[step, lane], count_contexts[step + 1, lane] = COUNT_HI, COUNT_LO
        grid = decoder.decode(count_contexts).ravel().astype(np.int64)
        flat = step * layout.lanes + lane
        counts = (grid[flat] << 6 | grid[flat + layout.lanes]) + 1
    if np.any(counts > k):
        raise rans.CorruptStream(f"a position stores more than k = {k} entries")
    first_step, entry_steps = _position_steps(layout, counts)
    contexts = np.zeros((entry_steps, layout.lanes), dtype=np.uint8)
    contexts[first_step, lane], contexts[first_step + 1, lane] = REF_HI, REF_LO
    total = len(counts)
    for first in range(0, total, DECODE_CHUNK):
        position, j = _entries_of(counts, first, min(first + DECODE_CHUNK, total))
        gap_step, entry_lane = first_step[position] + 2 + 2 * j, lane[position]
        bucket = ((j * BUCKETS) // counts[position]).astype(np.uint8)
        contexts[gap_step, entry_lane], contexts[gap_step + 1, entry_lane] = GAP + bucket, VALUE + bucket
    grid = decoder.decode(contexts)
    decoder.finish()
    reference = grid[first_step, lane].astype(np.int64) << 5 | grid[first_step + 1, lane]
    ids = np.empty((total, k), dtype=np.int64)
    values = np.empty((total, k), dtype=np.float32)
    position_bounds = np.concatenate([[0], np.cumsum(lengths)])
    for stream, raw in enumerate(raws):
        bit = 0  # raw fields are read in order, chunk after chunk
        for first in range(int(position_bounds[stream]), int(position_bounds[stream + 1]), DECODE_CHUNK):
            last = min(first + DECODE_CHUNK, int(position_bounds[stream + 1]))
            position, j = _entries_of(counts, first, last)
            gap_step, entry_lane = first_step[position] + 2 + 2 * j, lane[position]
            gap_symbol = grid[gap_step, entry_lane].astype(np.int64)
            value_symbol = grid[gap_step + 1, entry_lane].astype(np.int64)
            widths = np.stack([_gap_raw_length(gap_symbol), np.where(value_symbol == ESCAPE, ESCAPE_BITS, 0)], 1)
            try:
                fields = unpack_fields(raw, widths.ravel(), first_bit=bit).reshape(-1, 2)
            except ValueError:
                raise rans.CorruptStream("a coded block's raw bits are cut short") from None
            bit += int(widths.sum())
            _place(ids, values, first, counts[first:last], reference[first:last], _gaps_from(gap_symbol, fields[:, 0]),
                   value_symbol + fields[:, 1], k)
        if -(-bit // 8) != len(raw):
            raise rans.CorruptStream("a coded block's raw bits do not match its symbols")
    return ids, values


def _entries_of(counts: np.ndarray, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
    """(position, index within the position) of every entry of positions [first, last)."""
    part = counts[first:last]
    position = np.repeat(np.arange(first, last), part)
    return position, np.arange(int(part.sum())) - np.repeat(np.cumsum(part) - part, part)


def _place(ids: np.ndarray, values: np.ndarray, first: int, counts: np.ndarray, reference: np.ndarray,
           gaps: np.ndarray, distance: np.ndarray, k: int) -> None:
    """Write positions [first, first + len(counts)) from their entries' gaps and value distances."""
    starts = np.cumsum(counts) - counts
    flat_ids = np.cumsum(gaps)
    flat_ids -= np.repeat(flat_ids[starts] - gaps[starts], counts) + 1  # restart at each position
    codes = np.repeat(reference, counts) - distance
    if np.any(codes < 0):
        raise rans.CorruptStream("a stored value lies above its position's reference")
    rows = slice(first, first + len(counts))
    if np.all(counts == k):
        ids[rows], values[rows] = flat_ids.reshape(-1, k), dequantise(codes).reshape(-1, k)
        return
    ids[rows] = flat_ids[starts][:, None]  # padding repeats the first id, at probability 0
    values[rows] = -np.inf
    position = np.repeat(np.arange(first, first + len(counts)), counts)
    j = np.arange(len(flat_ids)) - np.repeat(starts, counts)
    ids[position, j], values[position, j] = flat_ids, dequantise(codes)
