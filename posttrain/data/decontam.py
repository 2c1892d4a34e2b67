"""Decontamination: training rows that contain an evaluation item are dropped (or flagged) before training.

Matching is on the text as it is trained (every turn), normalised: Unicode NFKC, format characters
(zero-width spaces and joiners, soft hyphens) removed, lower case, every run of punctuation and
whitespace a single space. An item is matched by what identifies it, never by a piece that many
other texts share:
- `question`: the question identifies the item when it has at least `min_words` content words and no
  other item of the references asks the same question. A long one (at least `n` words, default 13 as
  lm-eval's janitor) matches when a row holds any n consecutive words of it that no other item holds,
  or the whole question; a short one matches whole.
- `question+options`: a question that identifies nothing by itself (shared by several items, as MMLU's
  "Which of the following is true?", or too short) matches together with every one of its options,
  following it in the row.
- `question+answer`: such a question matches together with its gold answer, following it; for a
  question shared by several items only when the answer itself has `min_words` content words (a short
  answer to a generic question is what any quiz row holds).
A gold answer alone never removes a row ("the keeper's", "8 o'clock" are in many clean rows).

Word n-grams are hashed: each word to 64 stable bits (crc32 and adler32), a window to sum(word_j * c_j)
mod 2^64 with fixed odd multipliers, computed with numpy over the whole row and looked up in a sorted
array, so a row costs a few dozen vector operations whatever the index size. A hash hit is confirmed
on the words themselves before a row is reported, so a collision never removes a row.
"""
from __future__ import annotations

import functools
import re
import sys
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


@functools.cache
def _format_characters() -> dict[int, None]:
    """Unicode format characters (category Cf: U+200B, U+200D, U+00AD, U+FEFF, ...), which NFKC keeps:
    inside a word they would split it and hide an item. A table for str.translate, made once."""
    return {c: None for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"}


def words(text: str) -> list[str]:
    """Normalised words: NFKC, format characters dropped, lower case, split on anything that is not a
    letter or digit."""
    text = unicodedata.normalize("NFKC", text).translate(_format_characters()).lower()
    return [w for w in _SEPARATORS.split(text) if w]


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


# Function words: a question made only of these (and one or two others) identifies nothing.
STOPWORDS = frozenset("""
a an the and or but if then else of to in on at by for with from into onto over under about above below
between through during before after is are was were be been being am do does did done has have had having
it its this that these those there here what which who whom whose when where why how whether all any
each every some no not nor only own same so than too very can could will would shall should may might
must i me my we us our you your he him his she her they them their s t also just as such other following
""".split())

# Options and answer must lie within this many words after the end of the question (plus four times
# its longest option): far enough for an options list in between, near enough that a question and an
# answer in unrelated parts of a long row are not taken for a pair.
ANSWER_WINDOW = 64


def content_words(tokens: tuple[str, ...]) -> int:
    """Words that carry content: not function words, and not single letters (option labels)."""
    return sum(1 for t in tokens if t not in STOPWORDS and (len(t) > 1 or t.isdigit()))


@dataclass(frozen=True)
class EvalItem:
    """One evaluation item as normalised words: its question, gold answer and options (if any)."""

    task: str
    item: str  # an id, or the start of the question
    question: tuple[str, ...]
    answer: tuple[str, ...] = ()
    options: tuple[tuple[str, ...], ...] = ()


@dataclass
class Match:
    task: str
    item: str
    rule: str  # "question", "question+options" or "question+answer"
    ngram: str


@dataclass
class _Entry:
    item: EvalItem
    answer_counts: bool  # its answer may complete a match
    options_count: bool  # its options may complete a match


@dataclass
class _Question:
    """A question as the references ask it, and every item that asks it."""

    words: tuple[str, ...]
    entries: list[_Entry]
    identifying: bool  # the question alone identifies its (only) item
    lengths: frozenset[int] = frozenset()  # word counts of what may complete a match (answers, options)
    reach: int = 0  # how many words after the question its options and answers may lie
    # Items by their first option, and by their answer (each n-gram of a long one): a row is checked
    # against the items of a question hundreds of items ask with a few set look-ups.
    by_option: dict[tuple[str, ...], list[_Entry]] = field(default_factory=dict)
    by_answer: dict[tuple[str, ...], list[_Entry]] = field(default_factory=dict)


@dataclass
class Index:
    """Every evaluation item's question, hashed by the windows a training row is checked with."""

    n: int
    min_words: int
    questions: list[_Question] = field(default_factory=list)
    # window length -> (sorted window hashes, question numbers per hash, hash held by one question only)
    by_length: dict[int, tuple[np.ndarray, list[tuple[int, ...]], np.ndarray]] = field(default_factory=dict)

    @classmethod
    def build(cls, items: Iterable[EvalItem], n: int = 13, min_words: int = 3) -> "Index":
        if not 1 <= min_words <= n <= MAX_N:
            raise ValueError(f"need 1 <= min_words <= n <= {MAX_N}")
        unique: dict[tuple, EvalItem] = {}  # one item in two tasks (gsm8k, gsm8k_cot) is one item
        for item in items:
            if item.question:
                unique.setdefault((item.question, item.answer, item.options), item)
        asked: dict[tuple[str, ...], list[EvalItem]] = {}
        for item in unique.values():
            asked.setdefault(item.question, []).append(item)
        index = cls(n, min_words)
        grouped: dict[int, dict[int, set[int]]] = {}
        for number, (question, askers) in enumerate(asked.items()):
            generic = len(askers) > 1
            words_q = content_words(question)
            entries = [_Entry(item,
                              answer_counts=bool(item.answer) and words_q + content_words(item.answer) >= min_words
                              and (not generic or content_words(item.answer) >= min_words),
                              options_count=len(item.options) >= 2
                              and words_q + sum(content_words(o) for o in item.options) >= min_words)
                       for item in askers]
            lengths = {min(len(e.item.answer), n) for e in entries if e.answer_counts}
            lengths.update(len(o) for e in entries if e.options_count for o in e.item.options)
            longest = max((len(o) for e in entries for o in e.item.options), default=0)
            asked_here = _Question(question, entries, not generic and words_q >= min_words, frozenset(lengths),
                                   ANSWER_WINDOW + 4 * longest)
            for entry in entries:
                if entry.options_count:
                    asked_here.by_option.setdefault(entry.item.options[0], []).append(entry)
                if entry.answer_counts:
                    answer = entry.item.answer
                    for gram in {answer[i:i + n] for i in range(max(1, len(answer) - n + 1))}:
                        asked_here.by_answer.setdefault(gram, []).append(entry)
            index.questions.append(asked_here)
            length = min(len(question), n)
            for value in set(_windows(_word_hashes(list(question)), length).tolist()):
                grouped.setdefault(length, {}).setdefault(value, set()).add(number)
        for length, table in grouped.items():
            keys = np.array(sorted(table), dtype=np.uint64)
            holders = [tuple(sorted(table[k])) for k in keys.tolist()]
            index.by_length[length] = (keys, holders, np.array([len(h) == 1 for h in holders], dtype=bool))
        return index

    @property
    def items(self) -> int:
        return sum(len(q.entries) for q in self.questions)

    @property
    def generic_questions(self) -> int:
        """Items whose question other items ask too."""
        return sum(len(q.entries) for q in self.questions if len(q.entries) > 1)

    def find(self, text: str) -> Match | None:
        """The first evaluation item `text` contains, confirmed word by word; None if clean."""
        tokens = words(text)
        if not tokens:
            return None
        hashes = _word_hashes(tokens)
        # Questions that a window of the row hits but that need more than that window: number -> starts.
        pending: dict[int, set[int]] = {}
        # Windows of every length the index has, grown one word at a time: n vector additions in all.
        windows = np.zeros(len(hashes), dtype=np.uint64)
        for length in range(1, min(self.n, len(hashes)) + 1):
            count = len(hashes) - length + 1
            windows = windows[:count] + hashes[length - 1:length - 1 + count] * _MULTIPLIERS[length - 1]
            if length not in self.by_length:
                continue
            keys, holders, held_once = self.by_length[length]
            positions = np.searchsorted(keys, windows)
            positions[positions == len(keys)] = 0
            for start in np.flatnonzero(keys[positions] == windows).tolist():
                gram = tuple(tokens[start:start + length])
                slot = int(positions[start])
                for number in holders[slot]:
                    question = self.questions[number]
                    offsets = _offsets(question.words, gram)
                    if not offsets:
                        continue  # a hash collision
                    if question.identifying and held_once[slot]:
                        item = question.entries[0].item
                        return Match(item.task, item.item, "question", " ".join(gram))
                    pending.setdefault(number, set()).update(start - o for o in offsets)
        for number, starts in pending.items():
            match = self._confirm(self.questions[number], tokens, starts)
            if match is not None:
                return match
        return None

    def _confirm(self, question: _Question, tokens: list[str], starts: set[int]) -> Match | None:
        """The whole question at one of `starts`, and what one of its items needs besides."""
        size = len(question.words)
        for start in sorted(starts):
            end = start + size
            if start < 0 or tuple(tokens[start:end]) != question.words:
                continue
            label = " ".join(question.words)
            if question.identifying:
                item = question.entries[0].item
                return Match(item.task, item.item, "question", label)
            # Every run of words after the question as long as an option or answer.
            after = tokens[end:end + question.reach]
            runs = {tuple(after[i:i + k]) for k in question.lengths for i in range(len(after) - k + 1)}
            for run in runs & question.by_option.keys():
                for entry in question.by_option[run]:
                    if all(option in runs for option in entry.item.options):
                        item = entry.item
                        return Match(item.task, item.item, "question+options",
                                     label + " | " + " / ".join(" ".join(o) for o in item.options))
            for run in runs & question.by_answer.keys():
                item = question.by_answer[run][0].item
                return Match(item.task, item.item, "question+answer", label + " | " + " ".join(item.answer))
        return None


def _offsets(piece: tuple[str, ...], gram: tuple[str, ...]) -> list[int]:
    """Where `gram` starts inside `piece`."""
    length = len(gram)
    return [i for i in range(len(piece) - length + 1) if piece[i:i + length] == gram]


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
