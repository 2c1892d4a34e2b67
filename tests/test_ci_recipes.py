"""The CI regression recipes: every quality gate passes, and loss trajectories match the pinned ones.

All recipes share one registry, so stages with identical settings (the SFT teacher) are built once.
The runs use the CPU kernels the pins were made with (see scripts/pin_ci_trajectories.py for why).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cli

sys.path.insert(0, str(ROOT / "scripts"))
from pin_ci_trajectories import (  # noqa: E402
    ENVIRONMENT_KEY, NUMERICS_ENV, PINNED_CAPABILITY, library_versions, trajectories)

RECIPES = sorted((ROOT / "recipes" / "ci").glob("*.yaml"))
PINNED = json.loads((ROOT / "tests" / "reference" / "ci_trajectories.json").read_text())


@pytest.fixture(scope="module")
def shared_registry(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ci-registry")


@pytest.fixture(scope="module")
def pinned_kernels_available() -> str | None:
    """None when this machine can run the pinned CPU kernels, else why not."""
    import os

    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                           capture_output=True, text=True, env={**os.environ, **NUMERICS_ENV})
    capability = probe.stdout.strip()
    return None if capability == PINNED_CAPABILITY else (
        f"pins were made with {PINNED_CAPABILITY} CPU kernels; under {NUMERICS_ENV} this machine runs {capability!r}")


def test_pins_record_their_environment():
    recorded = PINNED[ENVIRONMENT_KEY]
    assert recorded["cpu_capability"] == PINNED_CAPABILITY
    assert set(library_versions()) <= set(recorded)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_ci_recipe_passes_its_gates_and_keeps_its_trajectories(recipe, shared_registry, monkeypatch,
                                                               pinned_kernels_available):
    import posttrain

    monkeypatch.setenv("POSTTRAIN_REGISTRY", str(shared_registry))
    for name, value in NUMERICS_ENV.items():
        monkeypatch.setenv(name, value)
    run = cli("run", str(recipe), timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.count("gate PASS") >= 1 and "gate FAIL" not in run.stdout
    result = posttrain.run(recipe)  # all cached now: reads the entries just built
    assert result.ran == []
    if pinned_kernels_available:
        pytest.skip(f"gates passed; trajectories not compared: {pinned_kernels_available}")
    recorded = PINNED[ENVIRONMENT_KEY]
    changed = {name: (recorded.get(name), version) for name, version in library_versions().items()
               if recorded.get(name) != version}
    hint = f"; libraries differ from the pins' (pinned, here): {changed}" if changed else ""
    got, want = trajectories(result), PINNED[recipe.name]
    assert set(got) == set(want)
    for stage, curves in want.items():
        for key, values in curves.items():
            assert got[stage][key] == pytest.approx(values, rel=0.02, abs=0.02), (stage, key, hint)
