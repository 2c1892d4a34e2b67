#!/usr/bin/env python
"""DPO stage: memory with and without precomputed reference log-probs, and overhead against plain trl.

A ~29M-parameter Llama (hidden 512, 8 layers; generated locally, random weights) makes the reference
copy large enough to see in the process's peak RSS (CPU). Measured in one run:
1. peak RSS, precompute_ref_log_probs true against false (the reference model kept in memory);
2. wall time of `posttrain run` (DPO stage) against a plain trl DPOTrainer script on the same base
   folder, data, steps and settings (goal: ratio <= 1.05). Whole processes, imports included.

    python bench/dpo_overhead.py [--steps 30] [--repeat 2]
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


def recipe(folder: Path, model: Path, steps: int, **stage) -> Path:
    body = {"name": "bench", "base": {"model": str(model), "chat_template": "llama-3.1"},
            "stages": {"dpo": {"kind": "dpo", "beta": 0.1, "save_steps": 10 ** 6, **stage,
                               "data": {"sources": [{"path": str(DATA)}], "max_length": 96},
                               "training": {"max_steps": steps, **COMMON}}}}
    path = folder / f"bench-{len(list(folder.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def measure(cmd: list[str], env: dict, out: Path) -> dict:
    subprocess.run([sys.executable, MEASURE, str(out), *cmd], env=env, check=True, capture_output=True)
    return json.loads(out.read_text().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
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

        memory = {}
        for precompute in (False, True):
            run = measure(cli + [str(recipe(tmp, model, args.steps, precompute_ref_log_probs=precompute))], env, results)
            memory[precompute] = run["peak_rss_mb"]
        print(f"DPO, {args.steps} steps, 29M-parameter Llama (fp32), CPU")
        print(f"  peak RSS, reference kept in memory      : {memory[False]:8.0f} MB  (baseline)")
        print(f"  peak RSS, reference log-probs precomputed: {memory[True]:8.0f} MB  ratio {memory[True] / memory[False]:.3f}")

        ours, plain = [], []
        for i in range(args.repeat):
            plain.append(measure([str(script), str(base), str(DATA), str(tmp / f"plain{i}"), str(args.steps),
                                  json.dumps(COMMON)], env, results)["seconds"])
            ours.append(measure(cli + [str(recipe(tmp, model, args.steps, seed=1000 + i))], env, results)["seconds"])
        p, o = statistics.median(plain), statistics.median(ours)
        print(f"  plain trl DPOTrainer script : {p:7.2f} s   (baseline, median of {args.repeat})")
        print(f"  posttrain run (dpo stage)   : {o:7.2f} s   ratio {o / p:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
