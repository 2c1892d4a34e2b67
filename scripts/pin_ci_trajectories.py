#!/usr/bin/env python
"""Record the loss trajectories of every training stage of the CI regression recipes.

tests/test_ci_recipes.py compares fresh runs against this file, so a behaviour change fails CI on
purpose. Rerun this script (and commit the result) only when a change is meant to move the curves.

    python scripts/pin_ci_trajectories.py
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "reference" / "ci_trajectories.json"
SERIES = ("loss", "rewards_margins")


def trajectories(result) -> dict[str, dict[str, list[float]]]:
    from posttrain.report import series

    found = {}
    for name, entry in result.entries.items():
        metrics = entry.manifest.get("metrics", {})
        curves = {key: [round(v, 6) for _, v in series(metrics.get(key))] for key in SERIES if series(metrics.get(key))}
        if curves:
            found[name] = curves
    return found


def main() -> None:
    import posttrain

    pinned = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["POSTTRAIN_REGISTRY"] = tmp
        for recipe in sorted((ROOT / "recipes" / "ci").glob("*.yaml")):
            pinned[recipe.name] = trajectories(posttrain.run(recipe))
    OUT.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
