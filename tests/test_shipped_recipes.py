"""Every recipe shipped in recipes/ validates (with each of its profiles)."""
from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(path):
    loaded = load_recipe(path)
    for profile in loaded.recipe.profiles:
        load_recipe(path, profile=profile)


def test_quickstart_runs_base_sft_dpo(tmp_path):
    import posttrain

    result = posttrain.run(RECIPES[[p.name for p in RECIPES].index("quickstart.yaml")])
    assert result.ran == ["base", "sft", "dpo"]
    sft, dpo = result.metrics("sft"), result.metrics("dpo")
    assert sft["final_eval_loss"] < sft["loss"][0]["loss"]
    assert dpo["rewards_accuracies"][-1]["value"] >= 0.75
    assert (result.path("dpo") / "chat_template.jinja").exists()
