#!/usr/bin/env python
"""DPO stage: memory with and without precomputed reference log-probs, and overhead against plain trl.

A ~29M-parameter Llama (hidden 512, 8 layers; generated locally, random weights) makes the reference
copy large enough to see in the process's peak RSS (CPU). Measured in one run:
1. peak RSS, precompute_ref_log_probs true against false (the reference model kept in memory);
2. wall time of `posttrain run` (DPO stage) against a plain trl DPOTrainer script on the same base
   folder, data, steps and settings (goal: ratio <= 1.05). Whole processes, imports included;
3. padded against padding-free batches on a mixed-length preference set (prompts of 1 to 300 words,
   answers of 1 to 120; a hidden-256, 4-layer Llama): padding fraction of trl's batches, and real tokens per second of training
   (same seed, so the same batches; reference precompute not counted).

    python bench/dpo_overhead.py [--steps 30] [--repeat 2] [--only memory,overhead,padding]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "dpo" / "tiny_prefs_train.jsonl"
MEASURE = str(Path(__file__).resolve().parent / "_measure.py")
COMMON = {"per_device_train_batch_size": 8, "learning_rate": 1e-4, "lr_scheduler_type": "constant",
          "logging_steps": 10, "report_to": [], "use_cpu": True, "bf16": False}

PLAIN_TRL = """
import sys, json
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
base, data, out, steps, common = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
tok = AutoTokenizer.from_pretrained(base)
model = AutoModelForCausalLM.from_pretrained(base)
ds = load_dataset("json", data_files=data, split="train")
args = DPOConfig(output_dir=out, max_steps=steps, max_length=96, beta=0.1, precompute_ref_log_probs=True,
                 save_strategy="no", activation_checkpointing=False, gradient_checkpointing=None, seed=42, **common)
trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
trainer.train()
trainer.save_model(out)
"""


def recipe(folder: Path, model: Path, steps: int, data: Path = DATA, max_length: int = 96, **stage) -> Path:
    body = {"name": "bench", "base": {"model": str(model), "chat_template": "llama-3.1"},
            "stages": {"dpo": {"kind": "dpo", "beta": 0.1, "save_steps": 10 ** 6, **stage,
                               "data": {"sources": [{"path": str(data)}], "max_length": max_length},
                               "training": {"max_steps": steps, **COMMON}}}}
    path = folder / f"bench-{len(list(folder.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def mixed_length_pairs(path: Path, pairs: int = 256, seed: int = 0) -> Path:
    """Preference pairs whose lengths vary as chat data's do (log-normal word counts)."""
    import random

    rng = random.Random(seed)
    words = "the a model answer question data token sequence river mountain seven apple green fast".split()

    def text(median: float, most: int) -> str:
        count = max(1, min(most, int(rng.lognormvariate(0, 1) * median)))
        return " ".join(rng.choice(words) for _ in range(count))

    with path.open("w") as fh:
        for _ in range(pairs):
            fh.write(json.dumps({"prompt": [{"role": "user", "content": text(40, 300)}],
                                 "chosen": [{"role": "assistant", "content": text(20, 120)}],
                                 "rejected": [{"role": "assistant", "content": text(20, 120)}]}) + "\n")
    return path


def stage_metrics(registry: Path) -> dict:
    """Metrics of the dpo entry the last run of the bench recipe made (its ref names the entry)."""
    key = json.loads((registry / "refs" / "bench" / "dpo.json").read_text())["key"]
    return json.loads((registry / "entries" / key / "manifest.json").read_text())["metrics"]


def measure(cmd: list[str], env: dict, out: Path) -> dict:
    subprocess.run([sys.executable, MEASURE, str(out), *cmd], env=env, check=True, capture_output=True)
    return json.loads(out.read_text().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--only", default="memory,overhead,padding", help="comma-separated parts to run")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, POSTTRAIN_REGISTRY=str(tmp / "registry"), HF_HUB_OFFLINE="1")
        model = tmp / "model"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "--out", str(model),
                        "--hidden", "512", "--layers", "8"], check=True, capture_output=True)
        results = tmp / "results.jsonl"
        cli = ["-m", "posttrain.cli", "run"]
        measure(cli + [str(recipe(tmp, model, 1, seed=1))], env, results)  # builds the base entry
        base = next(p for p in (tmp / "registry" / "entries").iterdir()
                    if json.loads((p / "manifest.json").read_text())["kind"] == "model")
        script = tmp / "plain_trl.py"
        script.write_text(PLAIN_TRL)

        if "memory" in parts:
            bench_memory(tmp, model, env, results, cli, args.steps)
        if "overhead" in parts:
            bench_overhead(tmp, model, base, script, env, results, cli, args.steps, args.repeat)
        if "padding" in parts:
            bench_padding(tmp, env, results, cli, args.steps)


def bench_memory(tmp: Path, model: Path, env: dict, results: Path, cli: list[str], steps: int) -> None:
    memory = {}
    for precompute in (False, True):
        run = measure(cli + [str(recipe(tmp, model, steps, precompute_ref_log_probs=precompute))], env, results)
        memory[precompute] = run["peak_rss_mb"]
    print(f"DPO, {steps} steps, 29M-parameter Llama (fp32), CPU")
    print(f"  peak RSS, reference kept in memory      : {memory[False]:8.0f} MB  (baseline)")
    print(f"  peak RSS, reference log-probs precomputed: {memory[True]:8.0f} MB  ratio {memory[True] / memory[False]:.3f}")


def bench_overhead(tmp: Path, model: Path, base: Path, script: Path, env: dict, results: Path, cli: list[str],
                   steps: int, repeat: int) -> None:
    ours, plain = [], []
    for i in range(repeat):
        plain.append(measure([str(script), str(base), str(DATA), str(tmp / f"plain{i}"), str(steps),
                              json.dumps(COMMON)], env, results)["seconds"])
        ours.append(measure(cli + [str(recipe(tmp, model, steps, seed=1000 + i))], env, results)["seconds"])
    p, o = statistics.median(plain), statistics.median(ours)
    print(f"  plain trl DPOTrainer script : {p:7.2f} s   (baseline, median of {repeat})")
    print(f"  posttrain run (dpo stage)   : {o:7.2f} s   ratio {o / p:.3f}  (goal <= 1.05)")


def bench_padding(tmp: Path, env: dict, results: Path, cli: list[str], steps: int) -> None:
    # A smaller Llama (hidden 256, 4 layers) than above: sequences here reach ~1000 tokens.
    model = tmp / "model-padding"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "--out", str(model),
                    "--hidden", "256", "--layers", "4"], check=True, capture_output=True)
    data = mixed_length_pairs(tmp / "mixed_pairs.jsonl")
    runs = {}
    for padding_free in (False, True):
        measure(cli + [str(recipe(tmp, model, steps, data=data, max_length=1024, padding_free=padding_free))],
                env, results)
        runs[padding_free] = stage_metrics(tmp / "registry")
    padded, packed = runs[False], runs[True]
    # Same seed and data, so both trained on the same pairs: real tokens/s compare as inverse times.
    print(f"DPO on mixed-length pairs, {steps} steps of {COMMON['per_device_train_batch_size']} pairs "
          f"(padding fraction of trl's padded batches: {padded['padding_fraction']:.3f})")
    print(f"  padded batches      : {padded['train_seconds']:7.2f} s train  (baseline)")
    print(f"  padding-free batches: {packed['train_seconds']:7.2f} s train  real tokens/s ratio "
          f"{padded['train_seconds'] / packed['train_seconds']:.2f}")


if __name__ == "__main__":
    main()
