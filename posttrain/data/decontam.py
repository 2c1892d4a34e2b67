"""Decontamination: training rows that contain an evaluation item are dropped (or flagged) before training.

Matching is on the text as it is trained (every turn), normalised: Unicode NFKC, lower case, every
run of punctuation and whitespace a single space. An evaluation item's pieces (its question and, where
the task has one, its gold answer) match a training row when
- the piece has at least `n` words (default 13, as lm-eval's janitor) and any n consecutive words of it
  appear in the row, or
- the piece has fewer than `n` but at least `min_words` words and appears in the row whole, so short
  questions are not missed (the recall gap of n-gram-only checks).
Pieces under `min_words` words (answers like "5" or "yes") are never matched alone: they would match
everything.

Word n-grams are hashed: each word to 64 stable bits (crc32 and adler32), a window to sum(word_j * c_j) mod 2^64 with fixed odd
multipliers, computed with numpy over the whole row and looked up in a sorted array, so a row costs a
few dozen vector operations whatever the index size. A hash hit is confirmed on the words themselves
before a row is reported, so a collision never removes a row.
"""
from __future__ import annotations

import re
import unicodedata
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

_SEPARATORS = re.compile(r"[\W_]+", re.UNICODE)
_MULTIPLIERS = np.array([0x9E3779B97F4A7C15 | 1, 0xC2B2AE3D27D4EB4F | 1, 0x165667B19E3779F9 | 1,
                         0xD6E8FEB86659FD93 | 1, 0xFF51AFD7ED558CCD | 1, 0xC4CEB9FE1A85EC53 | 1,
                         0x94D049BB133111EB | 1, 0xBF58476D1CE4E5B9 | 1, 0x2545F4914F6CDD1D | 1,
                         0x9FB21C651E98DF25 | 1, 0xA0761D6478BD642F | 1, 0xE7037ED1A0B428DB | 1,
                         0x8EBC6AF09C88C6E3 | 1, 0x589965CC75374CC3 | 1, 0x1D8E4E27C47D124F | 1,
                         0xEB44ACCAB455D165 | 1], dtype=np.uint64)
MAX_N = len(_MULTIPLIERS)


def words(text: str) -> list[str]:
    """Normalised words: NFKC, lower case, split on anything that is not a letter or digit."""
    return [w for w in _SEPARATORS.split(unicodedata.normalize("NFKC", text).lower()) if w]


def _word_hash(word: str) -> int:
    """64 bits that are the same in every process (Python's str hash is salted per process, and worker
    processes must hash as the one that built the index did)."""
    data = word.encode("utf-8")
    return (zlib.crc32(data) << 32) | zlib.adler32(data)


def _word_hashes(tokens: list[str]) -> np.ndarray:
    return np.fromiter((_word_hash(t) for t in tokens), dtype=np.uint64, count=len(tokens))


def _windows(hashes: np.ndarray, length: int) -> np.ndarray:
    """Hash of every window of `length` consecutive words (mod 2^64, wrapping)."""
    count = len(hashes) - length + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    out = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(length):
            out += hashes[j:j + count] * _MULTIPLIERS[j]
    return out


@dataclass(frozen=True)
class EvalItem:
    task: str
    item: str  # an id, or the start of the question
    piece: str  # "question" or "answer"
    words: tuple[str, ...]


@dataclass
class Match:
    task: str
    item: str
    piece: str
    ngram: str


@dataclass
class Index:
    """Every evaluation piece, hashed by the windows a training row is checked with."""

    n: int
    min_words: int
    by_length: dict[int, tuple[np.ndarray, list[list[EvalItem]]]] = field(default_factory=dict)

    @classmethod
    def build(cls, items: Iterable[EvalItem], n: int = 13, min_words: int = 3) -> "Index":
        if not 1 <= min_words <= n <= MAX_N:
            raise ValueError(f"need 1 <= min_words <= n <= {MAX_N}")
        grouped: dict[int, dict[int, list[EvalItem]]] = {}
        for item in items:
            size = len(item.words)
            if size < min_words:
                continue
            length = min(size, n)
            for value in _windows(_word_hashes(list(item.words)), length).tolist():
                grouped.setdefault(length, {}).setdefault(value, []).append(item)
        index = cls(n, min_words)
        for length, table in grouped.items():
            keys = np.array(sorted(table), dtype=np.uint64)
            index.by_length[length] = (keys, [table[k] for k in keys.tolist()])
        return index

    @property
    def pieces(self) -> int:
        return sum(len(v) for _, lists in self.by_length.values() for v in lists)

    def find(self, text: str) -> Match | None:
        """The first evaluation piece `text` contains, confirmed word by word; None if clean."""
        tokens = words(text)
        if not tokens:
            return None
        hashes = _word_hashes(tokens)
        # Windows of every length the index has, grown one word at a time: n vector additions in all.
        windows = np.zeros(len(hashes), dtype=np.uint64)
        for length in range(1, min(self.n, len(hashes)) + 1):
            count = len(hashes) - length + 1
            windows = windows[:count] + hashes[length - 1:length - 1 + count] * _MULTIPLIERS[length - 1]
            if length not in self.by_length:
                continue
            keys, lists = self.by_length[length]
            positions = np.searchsorted(keys, windows)
            positions[positions == len(keys)] = 0
            for start in np.flatnonzero(keys[positions] == windows).tolist():
                gram = tuple(tokens[start:start + length])
                for item in lists[int(positions[start])]:
                    if _contains(item.words, gram, length):
                        return Match(item.task, item.item, item.piece, " ".join(gram))
        return None


def _contains(piece: tuple[str, ...], gram: tuple[str, ...], length: int) -> bool:
    return any(piece[i:i + length] == gram for i in range(len(piece) - length + 1))


def row_text(row: dict[str, Any]) -> str:
    """All the text of a normalised row as it is trained: every turn, or both sides of a pair."""
    if "text" in row:
        return row["text"]
    parts = []
    for key in ("messages", "prompt", "chosen", "rejected"):
        for turn in row.get(key) or []:
            content = turn.get("content")
            parts.append(content if isinstance(content, str) else str(content))
            for call in turn.get("tool_calls") or []:
                parts.append(str(call))
    return "\n".join(parts)


_worker_index: Index | None = None  # each worker process's copy, set by its initializer


def _start_worker(index: Index) -> None:
    global _worker_index
    _worker_index = index


def _find_in_worker(text: str) -> Match | None:
    return _worker_index.find(text)


def scan(rows: Iterable[tuple[Any, dict]], index: Index, workers: int = 1, chunk: int = 512
         ) -> Iterator[tuple[Any, dict, Match | None]]:
    """(label, row, match or None) for every row, in order and streamed: memory does not grow with the
    rows. With `workers` > 1 the rows are checked by that many worker processes, each with a copy of
    the index. They are spawned, not forked: forking a process that runs torch or tokenizers threads can
    deadlock the child on a lock one of those threads held."""
    import itertools
    import multiprocessing

    iterator = iter(rows)
    if workers <= 1:
        for label, row in iterator:
            yield label, row, index.find(row_text(row))
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(index,)) as pool:
        while True:
            batch = list(itertools.islice(iterator, chunk * workers * 4))
            if not batch:
                break
            matches = pool.map(_find_in_worker, [row_text(row) for _, row in batch], chunksize=chunk)
            for (label, row), match in zip(batch, matches):
                yield label, row, match
