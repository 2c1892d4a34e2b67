"""The CI regression recipes: every quality gate passes, and loss trajectories match the pinned ones.

All recipes share one registry, so stages with identical settings (the SFT teacher) are built once.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cli

sys.path.insert(0, str(ROOT / "scripts"))
from pin_ci_trajectories import trajectories  # noqa: E402

RECIPES = sorted((ROOT / "recipes" / "ci").glob("*.yaml"))
PINNED = json.loads((ROOT / "tests" / "reference" / "ci_trajectories.json").read_text())


@pytest.fixture(scope="module")
def shared_registry(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ci-registry")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_ci_recipe_passes_its_gates_and_keeps_its_trajectories(recipe, shared_registry, monkeypatch):
    import posttrain

    monkeypatch.setenv("POSTTRAIN_REGISTRY", str(shared_registry))
    run = cli("run", str(recipe), timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.count("gate PASS") >= 1 and "gate FAIL" not in run.stdout
    result = posttrain.run(recipe)  # all cached now: reads the entries just built
    assert result.ran == []
    got, want = trajectories(result), PINNED[recipe.name]
    assert set(got) == set(want)
    for stage, curves in want.items():
        for key, values in curves.items():
            assert got[stage][key] == pytest.approx(values, rel=0.02, abs=0.02), (stage, key)
