#!/usr/bin/env python
"""Kill test: SIGKILL an SFT run at many points, resume each, and compare with the uninterrupted run.

    python bench/kill_resume.py [--points 15] [--steps 30] [--save-steps 2]

The reference is one uninterrupted `posttrain run`. Each trial starts the same recipe in a fresh
registry, SIGKILLs it at a different moment (right after in-stage checkpoint N is complete, or at a
random time, so some kills land while a checkpoint or the entry is being written), then runs it again
to the end. Reported per trial: where it was killed, the step it resumed from, the largest weight
difference and the difference of every metric that must not depend on the interruption (loss curve,
final_train_loss, steps). Goal: all equal (weights to 1e-5; fp32 on CPU is deterministic here).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = """
name: killtest
base: {{model: {model}, chat_template: llama-3.1}}
seed: 7
stages:
  sft:
    kind: sft
    save_steps: {save_steps}
    data: {{sources: [{{path: {data}}}], max_length: 96}}
    training: {{max_steps: {steps}, per_device_train_batch_size: 8, learning_rate: 3.0e-3,
               lr_scheduler_type: constant, logging_steps: 1, report_to: []}}
"""


def run(recipe: Path, registry: Path) -> subprocess.Popen:
    env = dict(os.environ, POSTTRAIN_REGISTRY=str(registry), ATEN_CPU_CAPABILITY="avx2")
    return subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(recipe)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finished(registry: Path) -> tuple[dict, dict]:
    import posttrain
    from safetensors.numpy import load_file

    reg = posttrain.Registry(registry)
    entry = reg.load(reg.get_ref("killtest/sft"))
    return entry.manifest["metrics"], load_file(entry.path / "model.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=15)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--save-steps", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kill-"))
    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=ROOT / "data" / "tiny-llama", data=ROOT / "data" / "sft" / "tiny_chat_train.jsonl",
                                    steps=args.steps, save_steps=args.save_steps))
    reference = work / "reference"
    assert run(recipe, reference).wait() == 0
    ref_metrics, ref_weights = finished(reference)
    rng = random.Random(0)
    checkpoints = list(range(args.save_steps, args.steps, args.save_steps))
    worst = {"weights": 0.0, "final_train_loss": 0.0, "loss_curve": 0.0}
    for trial in range(args.points):
        registry = work / f"trial{trial}"
        process = run(recipe, registry)
        if trial < len(checkpoints):  # right after checkpoint N is complete
            where = f"after checkpoint-{checkpoints[trial]}"
            pattern = f"work/*/checkpoints/checkpoint-{checkpoints[trial]}/trainer_state.json"
            while process.poll() is None and not list(registry.glob(pattern)):
                time.sleep(0.01)
        else:  # at a random moment of the stage, checkpoint and commit writes included
            delay = rng.uniform(0.5, 6.0)
            where = f"at {delay:.2f}s"
            time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert run(recipe, registry).wait() == 0, f"trial {trial}: the re-run failed"
        metrics, weights = finished(registry)
        weight_diff = max(float(abs(weights[k] - ref_weights[k]).max()) for k in ref_weights)
        loss_diff = abs(metrics["final_train_loss"] - ref_metrics["final_train_loss"])
        curve = [p["value"] for p in metrics["loss"]]
        ref_curve = [p["value"] for p in ref_metrics["loss"]]
        curve_diff = max(abs(a - b) for a, b in zip(curve, ref_curve)) if len(curve) == len(ref_curve) else float("inf")
        same_steps = metrics["steps"] == ref_metrics["steps"]
        worst = {"weights": max(worst["weights"], weight_diff), "final_train_loss": max(worst["final_train_loss"], loss_diff),
                 "loss_curve": max(worst["loss_curve"], curve_diff)}
        print(json.dumps({"trial": trial, "killed": where, "resumed_from_step": metrics["resumed_from_step"],
                          "steps_equal": same_steps, "max_weight_diff": weight_diff,
                          "final_train_loss_diff": loss_diff, "loss_curve_max_diff": curve_diff}), flush=True)
    print(json.dumps({"trials": args.points, "worst": worst}))


if __name__ == "__main__":
    main()
