#!/usr/bin/env python
"""Distill memory against the size of the capture, and against SFT on the same data (CPU is fine).

    python bench/distill_memory.py [--rows 500] [--factor 8] [--steps 20] [--encoding compact]

A capture of the tiny model (V = 1024) at k = 512 over `rows` chat rows and over `factor` x as many,
then the same distill run (same student, steps and batch) over each, and SFT over the small data:
peak RSS of each whole `posttrain run` process. Goals: distill over the large capture within 10% of
the small one (shards are read lazily, memory-mapped); distill <= 1.5x SFT.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEASURE = str(Path(__file__).resolve().parent / "_measure.py")
MODEL = ROOT / "data" / "tiny-llama"
TRAIN = {"max_steps": None, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "report_to": [],
         "logging_steps": 5}


def write_rows(path: Path, count: int) -> None:
    source = (ROOT / "data" / "sft" / "tiny_chat_train.jsonl").read_text().splitlines()
    path.write_text("".join(source[i % len(source)] + "\n" for i in range(count)))


def recipe(folder: Path, name: str, stages: dict) -> Path:
    import yaml

    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": {"model": str(MODEL), "chat_template": "llama-3.1"},
                                    "stages": stages}, sort_keys=False))
    return path


def measure(recipe_path: Path, env: dict, out: Path) -> dict:
    subprocess.run([sys.executable, MEASURE, str(out), "-m", "posttrain.cli", "run", str(recipe_path)], env=env,
                   check=True, capture_output=True)
    return json.loads(out.read_text().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--factor", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--encoding", default="fp16", help="the capture's encoding (fp16, q8-q12, compact)")
    args = parser.parse_args()
    training = {**TRAIN, "max_steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, POSTTRAIN_REGISTRY=str(tmp / "registry"), HF_HUB_OFFLINE="1")
        out = tmp / "measure.jsonl"
        results = {}
        for label, rows in (("small", args.rows), ("large", args.rows * args.factor)):
            data = tmp / f"{label}.jsonl"
            write_rows(data, rows)
            capture = {"kind": "capture_logits", "teacher": "base", "k": 512, "shard_sequences": 256,
                       "encoding": args.encoding,
                       "data": {"sources": [{"path": str(data)}], "max_length": 256}}
            measure(recipe(tmp, f"cap_{label}", {"capture": capture}), env, out)  # built once, then cached
            stages = {"capture": capture, "distill": {"kind": "distill", "model": "base", "teacher_logits": "capture",
                                                      "training": training}}
            results[f"distill_{label}"] = measure(recipe(tmp, f"kd_{label}", stages), env, out)["peak_rss_mb"]
            size = sum(p.stat().st_size for p in (tmp / "registry" / "entries").rglob("shard-*.safetensors"))
            results[f"capture_bytes_{label}"] = size
        sft = {"kind": "sft", "data": {"sources": [{"path": str(tmp / 'small.jsonl')}], "max_length": 256},
               "training": training}
        results["sft_small"] = measure(recipe(tmp, "sft_small", {"sft": sft}), env, out)["peak_rss_mb"]
    print(json.dumps({
        "rows": [args.rows, args.rows * args.factor],
        "encoding": args.encoding,
        "peak_rss_mb": {k: round(v, 1) for k, v in results.items() if "rss" in k or k.startswith(("distill", "sft"))},
        "large_vs_small_distill": round(results["distill_large"] / results["distill_small"], 3),
        "distill_vs_sft": round(results["distill_small"] / results["sft_small"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
