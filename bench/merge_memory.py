#!/usr/bin/env python
"""Peak memory of the merge stage merging three inputs, against the size of one input (goal <= 1.5x).

Three 29M-parameter Llamas (hidden 512, 8 layers, fp32, different seeds; generated locally) are merged
linearly by `posttrain run`. The merge's own memory is the process's peak RSS minus the peak RSS of
a process that imports the same libraries (torch, transformers, mergekit) and merges nothing,
measured in the same run.

    python bench/merge_memory.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MEASURE = str(Path(__file__).resolve().parent / "_measure.py")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in (1, 2, 3):
            subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "--out",
                            str(tmp / f"m{seed}"), "--hidden", "512", "--layers", "8", "--seed", str(seed)],
                           check=True, capture_output=True)
        size = sum(p.stat().st_size for p in (tmp / "m1").glob("*.safetensors"))
        recipe = tmp / "merge.yaml"
        recipe.write_text(yaml.safe_dump({
            "name": "bench", "base": {"model": str(tmp / "m1"), "chat_template": "llama-3.1"},
            "models": {"m2": {"model": str(tmp / "m2")}, "m3": {"model": str(tmp / "m3")}},
            "stages": {"merged": {"kind": "merge", "method": "linear", "options": json.loads(os.environ.get("MERGE_OPTIONS", "{}")),
                                  "models": [{"model": m, "parameters": {"weight": 1 / 3}} for m in ("base", "m2", "m3")]}},
        }))
        env = dict(os.environ, POSTTRAIN_REGISTRY=str(tmp / "registry"))
        results = tmp / "results.jsonl"
        # Register the inputs first so the measured run does nothing but the merge.
        subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe), "stages.merged.method=linear",
                        "stages.merged.parameters={normalize: true}"], env=env, check=True, capture_output=True)
        subprocess.run([sys.executable, MEASURE, str(results), "-m", "posttrain.cli", "run", str(recipe)],
                       env=env, check=True, capture_output=True)
        merge = json.loads(results.read_text().splitlines()[-1])
        imports = tmp / "imports.py"
        imports.write_text("import torch, transformers, mergekit.merge, mergekit.config, posttrain.runner\n"
                           "from transformers import AutoTokenizer\n")
        subprocess.run([sys.executable, MEASURE, str(results), str(imports)], env=env, check=True, capture_output=True)
        cached = json.loads(results.read_text().splitlines()[-1])
        own = merge["peak_rss_mb"] - cached["peak_rss_mb"]
        print("linear merge of three 29M-parameter fp32 Llamas, CPU")
        print(f"  one input: {size / 2**20:.0f} MB (baseline)")
        print(f"  peak RSS: merge run {merge['peak_rss_mb']:.0f} MB, libraries imported, no merge {cached['peak_rss_mb']:.0f} MB")
        own_anon = merge["peak_anon_mb"] - cached["peak_anon_mb"]
        print(f"  memory the merge itself used: {own:.0f} MB = {own / (size / 2**20):.2f}x one input (goal <= 1.5x)")
        print(f"  of which anonymous (not mmap'd input pages): {own_anon:.0f} MB = "
              f"{own_anon / (size / 2**20):.2f}x one input")


if __name__ == "__main__":
    main()
