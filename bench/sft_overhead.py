#!/usr/bin/env python
"""SFT stage overhead and packing gain, measured in one run on the tiny model (CPU is fine).

1. Wall time of `posttrain run` (SFT stage) against a plain trl SFTTrainer script on the same base
   folder, data, steps and settings (goal: ratio <= 1.05). Both are whole processes, imports included.
2. Effective (non-pad) tokens/s of packed and padding-free SFT against padded SFT.

    python bench/sft_overhead.py [--steps 150] [--repeat 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "sft" / "tiny_chat_train.jsonl"
COMMON = {"per_device_train_batch_size": 16, "learning_rate": 3e-3, "lr_scheduler_type": "constant",
          "logging_steps": 10, "report_to": [], "use_cpu": True, "bf16": False}

PLAIN_TRL = """
import sys, json
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
base, data, out, steps, common = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
tok = AutoTokenizer.from_pretrained(base)
model = AutoModelForCausalLM.from_pretrained(base)
ds = load_dataset("json", data_files=data, split="train")
args = SFTConfig(output_dir=out, max_steps=steps, max_length=96, assistant_only_loss=True, save_strategy="no",
                 activation_checkpointing=False, gradient_checkpointing=None, seed=42, **common)
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
trainer.train()
trainer.save_model(out)
"""


def variable_length_data(folder: Path, rows: int = 256) -> Path:
    """Answers from 1 to ~60 words, so padded batches carry a realistic share of padding."""
    import random

    rng = random.Random(0)
    words = "the cat sat on a mat while one blue bird sang to the red sun".split()
    path = folder / "variable.jsonl"
    with open(path, "w") as fh:
        for _ in range(rows):
            answer = " ".join(rng.choice(words) for _ in range(int(rng.paretovariate(1.2)) % 60 + 1))
            fh.write(json.dumps({"messages": [{"role": "user", "content": "Say something."},
                                              {"role": "assistant", "content": answer}]}) + "\n")
    return path


def recipe(folder: Path, steps: int, data: Path = DATA, max_length: int = 96, **stage) -> Path:
    body = {"name": "bench", "base": {"model": str(ROOT / "data" / "tiny-llama"), "chat_template": "llama-3.1"},
            "stages": {"sft": {"kind": "sft", "save_steps": 10 ** 6, **stage,
                               "data": {"sources": [{"path": str(data)}], "max_length": max_length},
                               "training": {"max_steps": steps, **COMMON}}}}
    path = folder / f"bench-{len(list(folder.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, POSTTRAIN_REGISTRY=str(tmp / "registry"), HF_HUB_OFFLINE="1")
        exe = [sys.executable, "-m", "posttrain.cli"]
        # The base entry (tokenizer with the Llama-3.1 template) is what both sides train from.
        setup = recipe(tmp, 1)
        subprocess.run(exe + ["run", str(setup)], env=env, check=True, capture_output=True)
        base = next(p for p in (tmp / "registry" / "entries").iterdir()
                    if json.loads((p / "manifest.json").read_text())["kind"] == "model")
        script = tmp / "plain_trl.py"
        script.write_text(PLAIN_TRL)

        ours, plain = [], []
        for i in range(args.repeat):  # alternate so machine noise hits both sides alike
            plain.append(timed([sys.executable, str(script), str(base), str(DATA), str(tmp / f"plain{i}"),
                                str(args.steps), json.dumps(COMMON)], env))
            ours.append(timed(exe + ["run", str(recipe(tmp, args.steps, seed=1000 + i))], env))  # new key each time
        p, o = statistics.median(plain), statistics.median(ours)
        print(f"SFT, {args.steps} steps, tiny model, CPU; median of {args.repeat}")
        print(f"  plain trl SFTTrainer script : {p:7.2f} s   (baseline)")
        print(f"  posttrain run (sft stage)   : {o:7.2f} s   ratio {o / p:.3f}  (goal <= 1.05)")

        rates = {}
        variable = variable_length_data(tmp)
        for mode in ("padded", "packing", "padding_free"):
            stage = {} if mode == "padded" else {mode: True}
            path = recipe(tmp, args.steps, data=variable, max_length=256, **stage)
            subprocess.run(exe + ["run", str(path)], env=env, check=True, capture_output=True)
            entry = subprocess.run(exe + ["show", "bench/sft"], env=env, check=True, capture_output=True, text=True)
            key = entry.stdout.split()[1]
            manifest = json.loads((tmp / "registry" / "entries" / key / "manifest.json").read_text())
            rates[mode] = manifest["metrics"]["tokens_per_second"], manifest["metrics"]["padding_fraction"]
        base_rate = rates["padded"][0]
        print("effective (non-pad) tokens/s against padded batches (variable-length answers, 1-60 words)")
        for mode, (rate, pad) in rates.items():
            print(f"  {mode:<13} {rate:9.1f} tok/s  ratio {rate / base_rate:.2f}  (padding fraction {pad})")


if __name__ == "__main__":
    main()
