#!/usr/bin/env python
"""`posttrain plan`'s training memory estimate against what a CPU run really allocates (CPU is fine).

    python bench/plan_memory.py [--hidden 256] [--layers 4] [--vocab 32000] [--seq 512] [--batch 4]

A random Llama of the given shape; SFT, DPO and distill (over a capture of the same model) run as whole
`posttrain run` processes, each measured by its peak anonymous RSS; the baseline is a process that
imports the same libraries and loads the same model in fp32 (what every training process holds before
its first step). Reported per stage: measured (peak - baseline), the estimate without the weights the
baseline already holds, and their ratio. CPU runs are fp32 with no mixed precision, so this checks the
fp32 terms of the estimate (states, activations, logits, the distill chunk); on a GPU,
`bench/gpu_smoke.py` compares the bf16 terms against torch.cuda.max_memory_allocated.
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
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

BASELINE = """
import sys, torch, transformers, trl, peft, datasets  # what a stage process imports
import posttrain.runner
from posttrain.hf.weights import load_trainable
model = load_trainable(sys.argv[1])
"""


def measure(args: list[str], env: dict, out: Path) -> float:
    """Peak anonymous RSS (MiB) of one process started through bench/_measure.py."""
    out.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, str(BENCH / "_measure.py"), str(out), *args], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
    return json.loads(out.read_text().splitlines()[-1])["peak_anon_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    import yaml

    import gpu_smoke
    from posttrain.planning.memory import Launch, architecture_of, training_bytes
    from posttrain.kinds import get_stage

    work = Path(tempfile.mkdtemp(prefix="plan-memory-"))
    shape = {"hidden_size": args.hidden, "intermediate_size": int(args.hidden * 2.75), "num_hidden_layers": args.layers,
             "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
    gpu_smoke.build_model(work / "base", shape)
    config = json.loads((work / "base" / "config.json").read_text())
    config.update(vocab_size=args.vocab, dtype="float32")
    (work / "base" / "config.json").write_text(json.dumps(config))
    from transformers import AutoModelForCausalLM, LlamaConfig

    import torch

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**config)).save_pretrained(str(work / "base"))
    chat, prefs = gpu_smoke.write_data(work, rows=64, words=args.seq)
    env = {**os.environ, "POSTTRAIN_REGISTRY": str(work / "registry"), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "2"}
    training = {"max_steps": args.steps, "per_device_train_batch_size": args.batch, "learning_rate": 1e-5,
                "report_to": [], "logging_steps": 1, "dataloader_num_workers": 0}
    data = {"sources": [{"path": str(chat)}], "max_length": args.seq}
    stages = {
        "sft": {"kind": "sft", "data": data, "training": training},
        "dpo": {"kind": "dpo", "beta": 0.1, "precompute_ref_log_probs": True,
                "data": {"sources": [{"path": str(prefs)}], "max_length": args.seq}, "training": training},
        "distill": {"kind": "distill", "teacher_logits": "capture", "chat_template": None, "max_length": args.seq,
                    "training": training},
    }
    capture = {"kind": "capture_logits", "teacher": "base", "data": data, "k": 32}
    script = work / "baseline.py"
    script.write_text(BASELINE)
    baseline = measure([str(script), str(work / "base")], env, work / "m.json")
    arch = architecture_of(str(work / "base"), ROOT)
    weights_mb = 4 * arch.parameters / 2 ** 20
    rows = {}
    for name, stage in stages.items():
        recipe_stages = {name: {**stage, "model": "base"}}
        if name == "distill":
            recipe_stages = {"capture": capture, **recipe_stages}
            recipe_stages[name].pop("chat_template")
        def write(path: Path, stages_in: dict) -> Path:
            path.write_text(yaml.safe_dump({"name": f"m_{name}", "base": {"model": str(work / "base"),
                                                                            "chat_template": "llama-3.1"},
                                            "stages": stages_in}, sort_keys=False))
            return path

        recipe = write(work / f"{name}.yaml", recipe_stages)
        if name == "distill":  # the capture first, in a process of its own: only the distill is measured
            first = subprocess.run([sys.executable, "-m", "posttrain.cli", "run",
                                    str(write(work / "capture.yaml", {"capture": capture}))],
                                   env=env, capture_output=True, text=True)
            if first.returncode != 0:
                raise SystemExit(first.stderr[-3000:])
        peak = measure(["-m", "posttrain.cli", "run", str(recipe)], env, work / "m.json")
        config_model = get_stage(stage["kind"]).Config.model_validate({**stage, "model": "base"}
                                                                      if name != "distill" else
                                                                      {**{k: v for k, v in stage.items() if k != "chat_template"},
                                                                       "model": "base"})
        parts = training_bytes(stage["kind"], config_model, arch, Launch(1, "ddp", False))
        estimate_mb = sum(parts.values()) / 2 ** 20 - weights_mb  # the baseline holds the fp32 weights
        measured = peak - baseline
        rows[name] = {"measured_mb": round(measured, 1), "estimate_mb": round(estimate_mb, 1),
                      "estimate_over_measured": round(estimate_mb / measured, 2),
                      "parts_mb": {k: round(v / 2 ** 20, 1) for k, v in parts.items()}}
        print(name, json.dumps(rows[name]), flush=True)
    print(json.dumps({"shape": shape | {"vocab": args.vocab}, "seq": args.seq, "batch": args.batch,
                      "params": arch.parameters, "baseline_mb": round(baseline, 1), "stages": rows}, indent=1))


if __name__ == "__main__":
    main()
