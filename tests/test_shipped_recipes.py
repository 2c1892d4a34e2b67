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


def test_quickstart_runs_and_registers_an_instruct_ready_base(tmp_path):
    import posttrain

    result = posttrain.run(RECIPES[[p.name for p in RECIPES].index("quickstart.yaml")])
    assert (result.path("instruct_base") / "chat_template.jinja").exists()
