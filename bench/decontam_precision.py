#!/usr/bin/env python
"""Decontamination precision and recall on quiz-style chat data.

    python bench/decontam_precision.py [--clean 100000] [--items 3000] [--planted 1000]

References are made like MMLU / ARC / TruthfulQA items: a third ask a generic question ("Which of the
following is correct?") whose content is in its four options, the rest a specific question, and every
gold answer is short (1-4 words, from a list of answers common in quizzes: "the United States",
"8 o'clock", "the keeper's"). Clean rows are chat turns in the same style drawn independently: quiz
questions with options lists that hold those same short answers, the same generic questions with
other options, and short replies. Planted rows hold an item disguised by case, re-wrapping,
punctuation, curly quotes, no-break spaces, full-width digits, zero-width characters, embedding in a
longer turn, or as question + options / question + answer. Goal: 0 clean rows removed in 100k, every
planted row found. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GENERIC = ["Which of the following is correct?", "Which of the following statements is true?",
           "Which of these is true?", "Which of the following is NOT true?", "What is the best answer?"]
SHORT_ANSWERS = ["the United States", "Paris, France", "8 o'clock", "the keeper's", "yes", "no", "none of the above",
                 "all of the above", "42", "the mitochondria", "photosynthesis", "1945", "George Washington",
                 "the Pacific Ocean", "carbon dioxide", "true", "false", "it depends", "the heart", "gravity"]
FULL_WIDTH = str.maketrans("0123456789", "\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18\uff19")


def vocabulary(size: int = 4000) -> list[str]:
    rng = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(size)]


def sentence(rng: random.Random, vocab: list[str], low: int, high: int) -> str:
    words = [rng.choice(vocab) for _ in range(rng.randint(low, high))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), str(rng.randint(2, 999)))
    return " ".join(words).capitalize()


def make_items(rng: random.Random, vocab: list[str], count: int) -> list[dict]:
    items = []
    for number in range(count):
        options = [sentence(rng, vocab, 2, 6) for _ in range(4)]
        if number % 3 == 0:
            gold = rng.randrange(4)
            items.append({"question": rng.choice(GENERIC), "choices": options, "answer": options[gold]})
        else:
            answer = rng.choice(SHORT_ANSWERS)
            options[rng.randrange(4)] = answer
            items.append({"question": sentence(rng, vocab, 6, 30) + "?", "choices": options, "answer": answer})
    return items


def clean_row(rng: random.Random, vocab: list[str]) -> str:
    """Quiz-style text that holds no reference item: generic questions with other options, the common
    short answers in options lists and replies, free chat."""
    kind = rng.randrange(4)
    answers = rng.sample(SHORT_ANSWERS, 4)
    if kind == 0:
        options = "\n".join(f"{'ABCD'[i]}. {a}" for i, a in enumerate(answers))
        return f"{rng.choice(GENERIC)}\n{options}\nAnswer: {answers[rng.randrange(4)]}"
    if kind == 1:
        options = " ".join(f"({'abcd'[i]}) {sentence(rng, vocab, 2, 6)}" for i in range(3)) + f" (d) {answers[0]}"
        return f"{sentence(rng, vocab, 6, 20)}? {options}. I think it is {answers[0]}."
    if kind == 2:
        return f"{rng.choice(GENERIC)} {sentence(rng, vocab, 5, 25)}. The answer: {answers[1]}, then {answers[2]}."
    return f"{sentence(rng, vocab, 10, 60)}. {answers[3]}!"


def disguise(rng: random.Random, item: dict, way: int) -> str:
    question, options, answer = item["question"], item["choices"], item["answer"]
    listed = "\n".join(f"{'ABCD'[i]}) {o}" for i, o in enumerate(options))
    generic = question in GENERIC
    whole = f"{question}\n{listed}" if generic else question  # a generic question is its options
    text = [whole.upper(),
            whole.replace(" ", "\n  "),
            whole.replace(" ", " ... ", 3).replace("?", "??!"),
            "\u201c" + whole.replace("'", "\u2019") + "\u201d",
            whole.replace(" ", "\u00a0"),
            whole.translate(FULL_WIDTH),
            whole.replace("e", "e\u200b", 2).replace("a", "a\u00ad", 1),
            f"Here is something I found: {whole} Let me know what you think about it.",
            f"{question}\n{listed}\nAnswer: {answer}",
            f"Q: {whole} A: {answer}"][way % 10]
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clean", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--planted", type=int, default=1000)
    args = parser.parse_args()

    from posttrain.data.decontam import EvalItem, Index, words

    rng = random.Random(7)
    vocab = vocabulary()
    items = make_items(rng, vocab, args.items)
    index = Index.build((EvalItem("quiz", str(i), tuple(words(it["question"])), tuple(words(it["answer"])),
                                  tuple(tuple(words(o)) for o in it["choices"])) for i, it in enumerate(items)))
    started = time.perf_counter()
    removed_clean: dict[str, int] = {}
    examples = []
    for _ in range(args.clean):
        text = clean_row(rng, vocab)
        match = index.find(text)
        if match is not None:
            removed_clean[match.rule] = removed_clean.get(match.rule, 0) + 1
            if len(examples) < 3:
                examples.append({"row": text[:160], "rule": match.rule, "matched": match.ngram[:120]})
    found_by_rule: dict[str, int] = {}
    missed = []
    for number in range(args.planted):
        item = items[rng.randrange(len(items))]
        match = index.find(disguise(rng, item, number))
        if match is None:
            missed.append(number % 10)
        else:
            found_by_rule[match.rule] = found_by_rule.get(match.rule, 0) + 1
    seconds = time.perf_counter() - started
    print(json.dumps({
        "clean_rows": args.clean, "clean_rows_removed": sum(removed_clean.values()),
        "clean_removed_share": sum(removed_clean.values()) / args.clean, "clean_removed_by_rule": removed_clean,
        "planted": args.planted, "planted_found": args.planted - len(missed),
        "recall": (args.planted - len(missed)) / args.planted, "found_by_rule": found_by_rule,
        "missed_disguises": sorted(set(missed)), "examples_of_clean_removed": examples,
        "items": index.items, "generic_questions": index.generic_questions,
        "rows_per_second": round((args.clean + args.planted) / seconds)}))


if __name__ == "__main__":
    main()
