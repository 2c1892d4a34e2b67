"""Every recipe shipped in recipes/ validates (with each of its profiles)."""
from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(path):
    loaded = load_recipe(path, deep=True)
    for profile in loaded.recipe.profiles:
        load_recipe(path, profile=profile, deep=True)


@pytest.mark.slow
def test_flagship_plan_works_offline_with_memory_estimates(registry_dir):
    from conftest import cli

    result = cli("plan", str(RECIPES[[p.name for p in RECIPES].index("intellect1_instruct.yaml")]))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for stage in ("base", "sft[learning_rate=1e-05,seed=1]", "sft.best", "dpo[beta=0.1,learning_rate=1e-06]",
                  "dpo.best", "distill", "merged[ties_even]", "merge_dev", "merged.best", "eval"):
        assert any(line.strip().startswith(stage + " ") for line in out.splitlines()), stage
    assert "memory estimates (8 processes" in out
    assert "10.2B params, fsdp over 8" in out
    assert not registry_dir.exists() or not any(registry_dir.glob("entries/*"))  # nothing downloaded or built


@pytest.mark.slow
def test_quickstart_runs_base_sft_dpo(tmp_path):
    import posttrain

    result = posttrain.run(RECIPES[[p.name for p in RECIPES].index("quickstart.yaml")])
    assert result.ran == ["base", "sft.data", "sft", "dpo.data", "dpo"]
    sft, dpo = result.metrics("sft"), result.metrics("dpo")
    assert sft["final_eval_loss"] < sft["loss"][0]["value"]
    assert dpo["rewards_accuracies"][-1]["value"] >= 0.75
    assert (result.path("dpo") / "chat_template.jinja").exists()
