#!/usr/bin/env python
"""Wall time of the quick verbs (goal: each under 2 s on a 2-core CPU machine).

Runs each command as a user would (a fresh `posttrain` process) on the tiny two-stage recipe, after
one real run has filled a throwaway registry, and reports the median of N runs against the baseline
of a bare `python -c pass`, in one run, so the figures are comparable on the same machine.

    python bench/cli_latency.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = """\
name: bench
base:
  model: {model}
  chat_template: llama-3.1
stages:
  a:
    kind: model
    model: {model}
"""


def timed(cmd: list[str], env: dict, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "bench.yaml"
        recipe.write_text(RECIPE.format(model=ROOT / "data" / "tiny-llama"))
        env = dict(os.environ, POSTTRAIN_REGISTRY=str(Path(tmp) / "registry"))
        exe = [sys.executable, "-m", "posttrain.cli"]
        subprocess.run(exe + ["run", str(recipe)], env=env, check=True, capture_output=True)
        baseline = timed([sys.executable, "-c", "pass"], env, args.repeat)
        print(f"baseline python -c pass: {baseline:.3f}s (median of {args.repeat})")
        print(f"{'command':<22} {'seconds':>8} {'x baseline':>11}  goal < 2 s")
        for verb in (["validate", str(recipe)], ["plan", str(recipe)], ["ls"], ["run", str(recipe)]):
            seconds = timed(exe + verb, env, args.repeat)
            label = "run (all cached)" if verb[0] == "run" else verb[0]
            print(f"{label:<22} {seconds:>8.3f} {seconds / baseline:>10.1f}x  {'ok' if seconds < 2 else 'SLOW'}")


if __name__ == "__main__":
    main()
