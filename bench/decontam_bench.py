#!/usr/bin/env python
"""Decontamination throughput and memory: synthetic training rows streamed against evaluation items.

    python bench/decontam_bench.py [--rows 1000000] [--items 10000]

Rows (chat turns of ~80 words) and items (questions of 5 to 40 words) are drawn from one 5,000-word
vocabulary, and 1 in 1,000 rows has an item planted in it. The scan runs twice, over rows/10 and over
all rows, each in a fresh process: rows/s and peak RSS (goal: >= 300k rows/min on 2 cores, peak RSS
independent of the number of rows), and every planted row must be found.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def vocabulary(size: int = 5000) -> list[str]:
    rng = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(size)]


def scan(rows: int, items: int) -> dict:
    from posttrain.data.decontam import EvalItem, Index, scan as scan_rows, words

    vocab = vocabulary()
    rng = random.Random(2)
    questions = [" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 40))) for _ in range(items)]
    started = time.perf_counter()
    index = Index.build((EvalItem("bench", str(i), tuple(words(q))) for i, q in enumerate(questions)),
                        n=13, min_words=3)
    built = time.perf_counter() - started

    def stream():
        row_rng = random.Random(3)
        for i in range(rows):
            text = " ".join(row_rng.choices(vocab, k=80))
            if i % 1000 == 0:
                text += " " + questions[i % items] + " " + " ".join(row_rng.choices(vocab, k=10))
            yield i, {"messages": [{"role": "user", "content": text[:200]}, {"role": "assistant", "content": text[200:]}]}

    started = time.perf_counter()
    found = sum(1 for _, _, match in scan_rows(stream(), index) if match is not None)
    seconds = time.perf_counter() - started
    return {"rows": rows, "items": items, "index_seconds": round(built, 2), "scan_seconds": round(seconds, 1),
            "rows_per_minute": round(rows / seconds * 60), "found": found, "planted": (rows + 999) // 1000,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: scan this many rows
    args = parser.parse_args()
    if args.one:
        print(json.dumps(scan(args.one, args.items)))
        return
    results = []
    for rows in (args.rows // 10, args.rows):
        out = subprocess.run([sys.executable, __file__, "--one", str(rows), "--items", str(args.items)],
                             capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    small, large = results
    print(json.dumps({"peak_rss_ratio_large_vs_small": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
                      "all_planted_found": all(r["found"] >= r["planted"] for r in results)}))


if __name__ == "__main__":
    main()
