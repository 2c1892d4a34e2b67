#!/usr/bin/env python
"""Stages as jobs on this machine: the tiny flagship one stage at a time vs `--slots 2`, in one run.

    python bench/executor_bench.py [--chain 8] [--skip-flagship]

1. The tiny flagship (`posttrain run recipes/intellect1_instruct.yaml --profile tiny`) into a fresh
   registry, inline (today's behaviour), then with `--slots 2` into another fresh registry. Reported:
   wall time of each and their ratio, whether both runs built the same key for every stage and made
   the same selections, and how many pairs of stages overlapped in time in the 2-slot run.
   On a 2-core machine a ratio near 1 is expected: the stages are CPU-bound, two at once share the same
   two cores (each job gets one BLAS thread). The gain is real where each slot has its own GPUs.
2. Scheduling overhead per stage: a chain of `--chain` stages that do nothing (the test kind `count`
   with 0 steps), inline vs as jobs (`--slots 1` cannot be jobs, so `--slots 2` on a chain, where no two
   stages can run at once). (jobs - inline) / stages is what a job costs: a Python start, imports, the
   recipe loaded and the keys computed again, and the driver's polling.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAGSHIP = ROOT / "recipes" / "intellect1_instruct.yaml"


def posttrain(*args: str, env=None) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "posttrain.cli", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"posttrain {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done


def built(registry: Path) -> dict[str, dict]:
    """stage -> (key, selections it was built from, start, end), from the run's refs and manifests."""
    found = {}
    for ref in sorted((registry / "refs").glob("*/*.json")):
        key = json.loads(ref.read_text())["key"]
        manifest = json.loads((registry / "entries" / key / "manifest.json").read_text())
        timings = manifest.get("timings", {})
        chosen = {path: sel["chosen"] for path, sel in manifest.get("selections", {}).items()}
        found[ref.stem] = {"key": key, "chosen": chosen, "start": timings.get("started"), "end": timings.get("finished"),
                           "stage": manifest.get("stage")}
    return found


def overlapping(stages: dict[str, dict]) -> int:
    spans = {s["stage"]: (s["start"], s["end"]) for s in stages.values() if s["start"]}
    return sum(1 for (a, (s1, e1)), (b, (s2, e2)) in itertools.combinations(spans.items(), 2) if s1 < e2 and s2 < e1)


def flagship(keep: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        where = keep or Path(tmp)
        one, two = where / "inline", where / "slots2"
        t_inline, _ = posttrain("run", str(FLAGSHIP), "--profile", "tiny", "--registry", str(one))
        t_slots, _ = posttrain("run", str(FLAGSHIP), "--profile", "tiny", "--registry", str(two), "--slots", "2")
        a, b = built(one), built(two)
        same_keys = {n: a[n]["key"] == b.get(n, {}).get("key") for n in a}
        same_choice = all(a[n]["chosen"] == b.get(n, {}).get("chosen") for n in a)
        print(f"tiny flagship, {len(a)} refs: inline {t_inline:.1f}s, 2 slots {t_slots:.1f}s, "
              f"ratio slots/inline {t_slots / t_inline:.2f}")
        print(f"  same key for every stage: {all(same_keys.values())}"
              + ("" if all(same_keys.values()) else f" (differ: {[n for n, s in same_keys.items() if not s]})"))
        print(f"  same selections: {same_choice}; overlapping stage pairs: inline {overlapping(a)}, "
              f"2 slots {overlapping(b)}")


def chain(length: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        site = tmp / "site" / "posttrain_testkinds-0.0.dist-info"
        site.mkdir(parents=True)
        (site / "METADATA").write_text("Metadata-Version: 2.1\nName: posttrain-testkinds\nVersion: 0.0\n")
        (site / "entry_points.txt").write_text("[posttrain.stages]\ncount = posttrain_testkinds:CountStage\n")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp / "site"), str(ROOT / "tests" / "plugins")])}
        stages = "\n".join(f"  s{i}: {{kind: count, model: {'base' if i == 0 else f's{i - 1}'}, steps: 0, label: l{i}}}"
                           for i in range(length))
        recipe = tmp / "chain.yaml"
        recipe.write_text(textwrap.dedent(f"""\
            name: chain
            base: {{model: {ROOT / 'data' / 'tiny-llama'}, chat_template: llama-3.1}}
            stages:
            """) + stages + "\n")
        t_inline, _ = posttrain("run", str(recipe), "--registry", str(tmp / "a"), env=env)
        t_jobs, _ = posttrain("run", str(recipe), "--registry", str(tmp / "b"), "--slots", "2", env=env)
        count = length + 1  # the base model is a stage too
        print(f"chain of {count} stages doing nothing: inline {t_inline:.1f}s, as jobs {t_jobs:.1f}s; "
              f"overhead per stage {(t_jobs - t_inline) / count:.2f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chain", type=int, default=8)
    parser.add_argument("--skip-flagship", action="store_true")
    parser.add_argument("--keep", type=Path, help="keep the flagship's two registries in this folder (inline/, "
                                                  "slots2/), e.g. for tests/test_executors.py's flagship test")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores")
    chain(args.chain)
    if not args.skip_flagship:
        flagship(args.keep)


if __name__ == "__main__":
    main()
