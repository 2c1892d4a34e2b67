"""Where the registry lives, and hub-id base models (resolved through a local Hugging Face cache)."""
from __future__ import annotations

import pytest

import json
import shutil

import posttrain
from conftest import TINY_MODEL, cli, write_recipe
from posttrain.registry import resolve_root

RECIPE = """
name: loc
base:
  model: {model}
  chat_template: llama-3.1
registry: ./from-recipe
stages:
  a: {{kind: count}}
"""


def test_registry_precedence_flag_env_recipe_default(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, RECIPE.format(model=TINY_MODEL))
    monkeypatch.delenv("POSTTRAIN_REGISTRY")
    result = posttrain.run(recipe)
    assert result.registry.root == (tmp_path / "from-recipe").resolve()  # relative to the recipe file
    monkeypatch.setenv("POSTTRAIN_REGISTRY", str(tmp_path / "from-env"))
    assert posttrain.run(recipe).registry.root == tmp_path / "from-env"
    assert posttrain.run(recipe, registry=tmp_path / "from-flag").registry.root == tmp_path / "from-flag"
    monkeypatch.delenv("POSTTRAIN_REGISTRY")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_root() == tmp_path / "cache" / "posttrain" / "registry"


def fake_hub_cache(home, repo_id: str, commit: str):
    """The on-disk layout huggingface_hub uses, so offline loading resolves `repo_id` from it."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(TINY_MODEL, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.mark.slow
def test_hub_id_base_records_the_resolved_revision(tmp_path, monkeypatch, registry_dir):
    commit = "0123456789abcdef0123456789abcdef01234567"
    fake_hub_cache(tmp_path / "hf", "PrimeIntellect/INTELLECT-1", commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_recipe(tmp_path, "name: hub\nbase:\n  model: PrimeIntellect/INTELLECT-1\n  revision: main\n"
                                    "  chat_template: llama-3.1\nstages:\n  a: {kind: count}\n")
    # A subprocess, because huggingface_hub reads HF_HOME once, at import.
    run = cli("run", str(recipe))
    assert run.returncode == 0, run.stderr
    key = posttrain.Registry(registry_dir).get_ref("hub/base")
    entry = registry_dir / "entries" / key
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["metrics"]["source"] == "hub"
    assert manifest["metrics"]["resolved_revision"] == commit
    assert (entry / "model.safetensors").is_file()


@pytest.mark.slow
def test_unreachable_hub_model_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_recipe(tmp_path, "name: hub\nbase:\n  model: nobody/nothing\nstages:\n  a: {kind: count}\n")
    run = cli("run", str(recipe))
    assert run.returncode == 2
    err = run.stderr
    assert "could not download 'nobody/nothing' (revision main) from the hub" in err
    assert "Traceback" not in err
