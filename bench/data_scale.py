#!/usr/bin/env python
"""Data at scale: peak memory and preparation speed of SFT data, posttrain against plain trl.

For 20k, 80k and 320k synthetic chat rows (~1.5 KB each, made here), in one run:
- `posttrain run` of a one-step SFT (the `sft.data` step prepares the data, then one training step),
- a plain trl script on the same base, data and settings (`load_dataset("json")` + SFTTrainer, which
  tokenises in its constructor, then one step),
- `posttrain run` again with another learning rate: the prepared data is reused (time spent on data).
Each is its own process under bench/_measure.py: peak RSS, peak anonymous RSS (mapped file pages left
out), and the largest worker process's peak.

Goals (issue 10): peak RSS at 320k <= 1.25x that at 20k; preparation rows/s >= 2x trl's; the second
SFT spends ~0 s on data.

    python bench/data_scale.py [--sizes 20000 80000 320000] [--max-length 512]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TINY = ROOT / "data" / "tiny-llama"
WORDS = ("the of and to in a is that for it as with was on be by this are from at or an which model data "
         "train token value answer question because result first second small large number").split()

PLAIN_TRL = """
import json, sys, time
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
sys.path.insert(0, sys.argv[6])
from posttrain.hf.chat_templates import resolve_chat_template
base, data, out, max_length, report = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
tok = AutoTokenizer.from_pretrained(base)
tok.chat_template = resolve_chat_template("llama-3.1", sys.argv[6]).text
tok.pad_token = tok.pad_token or tok.eos_token
model = AutoModelForCausalLM.from_pretrained(base)
started = time.perf_counter()
ds = load_dataset("json", data_files=data, split="train")
args = SFTConfig(output_dir=out, max_steps=1, max_length=max_length, assistant_only_loss=True, save_strategy="no",
                 per_device_train_batch_size=8, report_to=[], use_cpu=True, bf16=False,
                 activation_checkpointing=False, gradient_checkpointing=None)
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
prepared = time.perf_counter() - started
trainer.train()
json.dump({"prepare_seconds": prepared}, open(report, "w"))
"""


def make_rows(path: Path, rows: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as handle:
        for _ in range(rows):
            messages = [{"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(40, 90)))},
                        {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(140, 220)))}]
            handle.write(json.dumps({"messages": messages}) + "\n")


def measure(out: Path, args: list[str], env: dict[str, str]) -> dict:
    before = out.read_text().count("\n") if out.exists() else 0
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "_measure.py"), str(out), *args],
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    return {**json.loads(out.read_text().splitlines()[before]), "stdout": proc.stdout}


def recipe(folder: Path, data: Path, max_length: int) -> Path:
    body = {"name": "datascale", "base": {"model": str(TINY), "chat_template": "llama-3.1"},
            "stages": {"sft": {"kind": "sft", "data": {"sources": [{"path": str(data)}], "max_length": max_length},
                               "training": {"max_steps": 1, "per_device_train_batch_size": 8, "report_to": []}}}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def manifest(registry: Path, ref: str) -> dict:
    from posttrain.registry import Registry

    return Registry(registry).load(Registry(registry).get_ref(ref)).manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 80000, 320000])
    parser.add_argument("--max-length", type=int, default=512)
    opts = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for rows in opts.sizes:
            folder = tmp / str(rows)
            folder.mkdir()
            data = folder / "rows.jsonl"
            make_rows(data, rows)
            env = {**os.environ, "HF_DATASETS_CACHE": str(folder / "hf-cache"), "PYTHONPATH": str(ROOT)}
            log = folder / "measure.jsonl"
            registry = folder / "registry"
            path = recipe(folder, data, opts.max_length)
            ours = measure(log, ["-m", "posttrain.cli", "run", str(path), "--registry", str(registry)], env)
            prep = manifest(registry, "datascale/sft.data")
            again = measure(log, ["-m", "posttrain.cli", "run", str(path), "stages.sft.training.learning_rate=1e-4",
                                  "--registry", str(registry)], env)
            second = manifest(registry, "datascale/sft")
            script = folder / "plain_trl.py"
            script.write_text(PLAIN_TRL)
            report = folder / "trl.json"
            theirs = measure(log, [str(script), str(TINY), str(data), str(folder / "trl-out"), str(opts.max_length),
                                   str(report), str(ROOT)], env)
            trl_prepare = json.loads(report.read_text())["prepare_seconds"]
            row = {"rows": rows, "data_mb": round(data.stat().st_size / 1e6, 1),
                   "posttrain_peak_rss_mb": round(ours["peak_rss_mb"]), "posttrain_peak_anon_mb": round(ours["peak_anon_mb"]),
                   "posttrain_worker_peak_rss_mb": round(ours["peak_child_rss_mb"]),
                   "posttrain_prepare_s": prep["timings"]["seconds"],
                   "posttrain_rows_per_s": round(rows / prep["timings"]["seconds"]),
                   "trl_peak_rss_mb": round(theirs["peak_rss_mb"]), "trl_peak_anon_mb": round(theirs["peak_anon_mb"]),
                   "trl_prepare_s": round(trl_prepare, 1), "trl_rows_per_s": round(rows / trl_prepare),
                   "second_sft_data_s": second["metrics"]["data_seconds"],
                   "second_run_data_step": "cached" if any(line.split()[1:2] == ["sft.data"] and "cached" in line
                                                           for line in again["stdout"].splitlines()) else "rebuilt",
                   "second_run_total_s": round(again["seconds"], 1)}
            results.append(row)
            print(json.dumps(row), flush=True)
    first, last = results[0], results[-1]
    print(f"\npeak RSS {last['rows']} vs {first['rows']} rows: posttrain "
          f"{last['posttrain_peak_rss_mb'] / first['posttrain_peak_rss_mb']:.2f}x "
          f"(anonymous {last['posttrain_peak_anon_mb'] / first['posttrain_peak_anon_mb']:.2f}x), "
          f"trl {last['trl_peak_rss_mb'] / first['trl_peak_rss_mb']:.2f}x (goal <= 1.25x)")
    for row in results:
        print(f"{row['rows']:>7} rows: preparation {row['posttrain_rows_per_s']} rows/s vs trl {row['trl_rows_per_s']} "
              f"({row['posttrain_rows_per_s'] / row['trl_rows_per_s']:.2f}x, goal >= 2x); second SFT on the same "
              f"data: {row['second_sft_data_s']} s on data")


if __name__ == "__main__":
    main()
