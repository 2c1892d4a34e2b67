"""Interleaved static rANS, vectorised over lanes with numpy.

A *lane* is one independent rANS state that codes a run of symbols; many lanes are coded side by side,
one numpy operation per step for all of them, so decoding costs a few dozen array operations per step
instead of a Python loop per symbol. Lanes belong to *streams* (one per stored sequence, so each can be
read on its own); the lanes of a stream share one array of 16-bit words, read in a fixed order (step by
step, lanes in ascending order), which needs no per-lane offsets: whether a lane reads a word depends on
its own state only, so a cumulative sum gives every lane its word.

Each symbol is coded under a *context*: a row of a frequency table (one row per context, counts summing
to 2**PROB_BITS). Context 0 is reserved: it codes nothing (frequency 2**PROB_BITS for symbol 0 leaves the
state untouched), so lanes with fewer symbols than the longest are padded with it.

State: 32 bits held in int64, lower bound 2**16, words of 16 bits. A lane's stream begins with its final
encoder state (two words); the encoder starts every lane at the lower bound, so a decoder that does not
end there has read damaged data.
"""
from __future__ import annotations

import numpy as np

PROB_BITS = 12
TOTAL = 1 << PROB_BITS
LOWER = 1 << 16
WORD = 16
NULL_CONTEXT = 0


class CorruptStream(ValueError):
    """The words do not decode to a valid set of symbols (a damaged or truncated file)."""


def normalise(counts: np.ndarray) -> np.ndarray:
    """Integer frequencies summing to TOTAL per row, every counted symbol at least 1 (so it stays codable),
    close to the counts' proportions. Row 0 becomes the null context."""
    counts = np.asarray(counts, dtype=np.float64)
    freq = np.zeros(counts.shape, dtype=np.int64)
    for row in range(1, len(counts)):
        seen = counts[row] > 0
        if not seen.any():
            freq[row, 0] = TOTAL
            continue
        if seen.sum() > TOTAL:
            raise ValueError(f"context {row} has more than {TOTAL} distinct symbols")
        share = counts[row] / counts[row].sum() * TOTAL
        row_freq = np.where(seen, np.maximum(1, np.floor(share)), 0).astype(np.int64)
        # Largest remainders get the rounding leftover; if the floor of 1 overshot, the most
        # over-served symbols give it back. Either way every counted symbol keeps at least 1.
        while (gap := TOTAL - int(row_freq.sum())) != 0:
            if gap > 0:
                candidates = np.flatnonzero(seen)
                order = candidates[np.argsort(-(share[candidates] - row_freq[candidates]), kind="stable")]
                row_freq[order[:gap]] += 1
            else:
                candidates = np.flatnonzero(row_freq > 1)
                order = candidates[np.argsort(-(row_freq[candidates] - share[candidates]), kind="stable")]
                row_freq[order[:-gap]] -= 1
        freq[row] = row_freq
    freq[NULL_CONTEXT] = 0
    freq[NULL_CONTEXT, 0] = TOTAL
    return freq


class Tables:
    """Frequency rows plus what encoding (cumulative starts) and decoding (a slot lookup) need."""

    def __init__(self, freq: np.ndarray):
        freq = np.asarray(freq, dtype=np.int64)
        if freq.ndim != 2 or np.any(freq < 0) or np.any(freq.sum(1) != TOTAL):
            raise CorruptStream(f"frequency tables must be rows summing to {TOTAL}")
        if freq.shape[1] > 1 << 8:
            raise ValueError("at most 256 symbols per context")
        self.freq = freq
        self.cum = np.concatenate([np.zeros((len(freq), 1), np.int64), np.cumsum(freq, 1)[:, :-1]], 1)
        self._lookup: np.ndarray | None = None

    @property
    def lookup(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per (context, slot) at context * TOTAL + slot: the symbol, its frequency and slot - its start."""
        if self._lookup is None:
            contexts, alphabet = self.freq.shape
            symbols = np.repeat(np.tile(np.arange(alphabet), contexts), self.freq.ravel())
            rows = np.repeat(np.arange(contexts), TOTAL)
            slots = np.tile(np.arange(TOTAL), contexts)
            freq, cum = self.freq[rows, symbols], self.cum[rows, symbols]
            self._lookup = (symbols.astype(np.uint8), freq, slots - cum)
        return self._lookup


def encode(symbols: np.ndarray, contexts: np.ndarray, tables: Tables, lane_stream: np.ndarray,
           streams: int) -> list[np.ndarray]:
    """symbols, contexts: [steps, lanes]; lane_stream: [lanes] stream of each lane (ascending, each stream's
    lanes contiguous). Returns one uint16 word array per stream: its lanes' initial states, then the
    renormalisation words in decoding order."""
    steps, lanes = symbols.shape
    state = np.full(lanes, LOWER, dtype=np.int64)
    emitted_step, emitted_lane, emitted_word = [], [], []
    limit_per_freq = (LOWER >> PROB_BITS) << WORD
    for step in range(steps - 1, -1, -1):
        context, symbol = contexts[step], symbols[step]
        freq, cum = tables.freq[context, symbol], tables.cum[context, symbol]
        if np.any(freq == 0):
            raise ValueError("a symbol with frequency 0 cannot be coded (tables were fitted on other data)")
        need = state >= limit_per_freq * freq
        if need.any():
            where = np.flatnonzero(need)
            emitted_step.append(np.full(len(where), step, np.int64))
            emitted_lane.append(where)
            emitted_word.append(state[where] & 0xFFFF)
            state[where] >>= WORD
        state = (state // freq << PROB_BITS) + state % freq + cum
    step_of = np.concatenate(emitted_step) if emitted_step else np.zeros(0, np.int64)
    lane_of = np.concatenate(emitted_lane) if emitted_lane else np.zeros(0, np.int64)
    words = np.concatenate(emitted_word) if emitted_word else np.zeros(0, np.int64)
    stream_of = lane_stream[lane_of]
    order = np.lexsort((lane_of, step_of, stream_of))  # decoding order: stream, step, lane
    words, stream_of = words[order], stream_of[order]
    bounds = np.searchsorted(stream_of, np.arange(streams + 1))
    lane_bounds = np.searchsorted(lane_stream, np.arange(streams + 1))
    out = []
    for stream in range(streams):
        first = state[lane_bounds[stream]:lane_bounds[stream + 1]]
        head = np.stack([first >> WORD, first & 0xFFFF], 1).ravel()
        out.append(np.concatenate([head, words[bounds[stream]:bounds[stream + 1]]]).astype(np.uint16))
    return out


class Decoder:
    """Inverse of `encode`, resumable: `decode` may be called several times (later contexts can depend on
    symbols already read). The streams are words[stream_bounds[i]:stream_bounds[i + 1]] (uint16);
    `finish` raises CorruptStream unless every stream decoded exactly its own words back to the start
    state."""

    def __init__(self, words: np.ndarray, stream_bounds: np.ndarray, tables: Tables, lane_stream: np.ndarray):
        self.bounds = np.asarray(stream_bounds, dtype=np.int64)
        self.words = np.asarray(words, dtype=np.uint16)
        self.tables, self.lane_stream = tables, np.asarray(lane_stream, dtype=np.int64)
        streams = len(self.bounds) - 1
        self.lane_bounds = np.searchsorted(self.lane_stream, np.arange(streams + 1))
        rank_in_stream = np.arange(len(self.lane_stream)) - self.lane_bounds[self.lane_stream]
        head = self.bounds[:-1][self.lane_stream] + 2 * rank_in_stream
        if len(head) and np.any(head + 1 >= self.bounds[1:][self.lane_stream]):
            raise CorruptStream("the coded targets end before every lane's state")
        self.state = (self.words[head].astype(np.int64) << WORD) | self.words[head + 1]
        self.read = self.bounds[:-1] + 2 * np.diff(self.lane_bounds)  # next word of each stream

    def decode(self, contexts: np.ndarray) -> np.ndarray:
        """contexts: [steps, lanes] -> symbols [steps, lanes] (uint8)."""
        steps, lanes = contexts.shape
        if np.any(contexts >= len(self.tables.freq)) or np.any(contexts < 0):
            raise CorruptStream("context outside the frequency tables")
        symbol_of, freq_of, bias_of = self.tables.lookup
        mask = TOTAL - 1
        # Reads of a damaged stream may run past its end: pad so they stay in bounds (finish() notices).
        words = np.concatenate([self.words, np.zeros(lanes + 1, np.uint16)])
        lane_stream, read, state = self.lane_stream, self.read, self.state
        single = len(read) == 1
        first_lane, next_first = self.lane_bounds[:-1], self.lane_bounds[1:]
        out = np.empty((steps, lanes), dtype=np.uint8)
        slot, low = np.empty(lanes, dtype=np.int64), np.empty(lanes, dtype=np.int64)
        for step in range(steps):
            np.left_shift(contexts[step], PROB_BITS, out=slot, dtype=np.int64)  # (context, slot) index
            np.bitwise_and(state, mask, out=low)
            slot += low
            np.take(symbol_of, slot, out=out[step])
            state >>= PROB_BITS
            state *= freq_of[slot]
            state += bias_of[slot]
            need = state < LOWER
            counted = need.cumsum()
            if not counted[-1]:
                continue
            if single:
                index = counted + (read[0] - 1)
                read[0] += counted[-1]
            else:
                padded = np.concatenate([[0], counted])
                before = padded[first_lane]  # reads by lanes of earlier streams at this step
                index = read[lane_stream] + counted - before[lane_stream] - 1
                read += padded[next_first] - before
            state = np.where(need, (state << WORD) | words[index], state)
        self.state = state
        return out

    def finish(self) -> None:
        if np.any(self.state != LOWER) or np.any(self.read != self.bounds[1:]):
            raise CorruptStream("the coded targets do not decode to a consistent end state (damaged data)")
