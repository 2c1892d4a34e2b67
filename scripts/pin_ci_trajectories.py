#!/usr/bin/env python
"""Record the loss trajectories of every training stage of the CI regression recipes.

tests/test_ci_recipes.py compares fresh runs against this file, so a behaviour change fails CI on
purpose. Rerun this script (and commit the result) only when a change is meant to move the curves.

    python scripts/pin_ci_trajectories.py

Why the CPU kernels are pinned: PyTorch picks its vectorised CPU kernels (softmax, norms, adds) by
what the processor supports, AVX-512 where it exists, else AVX2. The two round differently in the last
bits, and 120 steps of training at a constant 3e-3 learning rate, followed by capture and distillation,
amplify that into a 3.5% different final distillation loss (0.777 with AVX-512 kernels, 0.804 with
AVX2 kernels, same code, libraries and data). Every x86-64 machine CI runs on has AVX2, so pins are made
and checked with `ATEN_CPU_CAPABILITY=avx2`: then any such machine reproduces them. The library versions
they were made with are recorded beside them, so a mismatch after an upgrade says so.
"""
from __future__ import annotations

import json
import os
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "reference" / "ci_trajectories.json"
SERIES = ("loss", "rewards_margins")
# Environment every pinned run uses; must be set before torch is imported.
NUMERICS_ENV = {"ATEN_CPU_CAPABILITY": "avx2"}
PINNED_CAPABILITY = "AVX2"  # what torch.backends.cpu.get_cpu_capability() reports under NUMERICS_ENV
LIBRARIES = ("torch", "transformers", "trl", "accelerate", "datasets", "safetensors", "numpy")
ENVIRONMENT_KEY = "_environment"


def library_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in LIBRARIES}


def trajectories(result) -> dict[str, dict[str, list[float]]]:
    from posttrain.report import series

    found = {}
    for name, entry in result.entries.items():
        if name in result.selections:  # a select step stands for a candidate already listed
            continue
        metrics = entry.manifest.get("metrics", {})
        curves = {key: [round(v, 6) for _, v in series(metrics.get(key))] for key in SERIES if series(metrics.get(key))}
        if curves:
            found[name] = curves
    return found


def main() -> None:
    os.environ.update(NUMERICS_ENV)
    import torch

    import posttrain

    capability = torch.backends.cpu.get_cpu_capability()
    if capability != PINNED_CAPABILITY:
        raise SystemExit(f"this machine runs {capability} kernels under {NUMERICS_ENV}; pins need {PINNED_CAPABILITY}")
    pinned: dict = {ENVIRONMENT_KEY: {**library_versions(), "cpu_capability": capability, **NUMERICS_ENV}}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["POSTTRAIN_REGISTRY"] = tmp
        for recipe in sorted((ROOT / "recipes" / "ci").glob("*.yaml")):
            pinned[recipe.name] = trajectories(posttrain.run(recipe))
    OUT.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
