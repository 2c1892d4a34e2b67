"""A corpus of broken recipes: each gives its exact `FILE:LINE: key: message`, exit 2, no traceback,
and leaves the registry untouched."""
from __future__ import annotations

import pytest

from conftest import TINY_MODEL, write_recipe
from posttrain.cli import main

GOOD_HEAD = f"""\
name: demo
base:
  model: {TINY_MODEL}
  chat_template: llama-3.1
"""

CASES = {
    "unknown-top-level-key": (
        GOOD_HEAD + "stagse:\n  a: {kind: count}\n",
        ["recipe.yaml:5: stagse: unknown key (did you mean 'stages'?)", "recipe.yaml:1: stages: required key is missing"],
    ),
    "unknown-stage-key": (
        GOOD_HEAD + "stages:\n  a:\n    kind: count\n    stesp: 3\n",
        ["recipe.yaml:8: stages.a.stesp: unknown key (did you mean 'steps'?)"],
    ),
    "wrong-type": (
        GOOD_HEAD + "stages:\n  a:\n    kind: count\n    steps: many\n",
        ["recipe.yaml:8: stages.a.steps: must be a valid integer, unable to parse string as an integer"],
    ),
    "unknown-kind": (
        GOOD_HEAD + "stages:\n  a:\n    kind: cuont\n",
        ["recipe.yaml:7: stages.a.kind: unknown stage kind 'cuont' (did you mean 'count'?)"],
    ),
    "missing-kind": (
        GOOD_HEAD + "stages:\n  a:\n    steps: 3\n",
        ["recipe.yaml:6: stages.a: missing `kind`"],
    ),
    "missing-reference": (
        GOOD_HEAD + "stages:\n  a:\n    kind: count\n    model: sft\n",
        ["recipe.yaml:8: stages.a.model: refers to 'sft', which is not a stage or model"],
    ),
    "cycle": (
        GOOD_HEAD + "stages:\n  a:\n    kind: count\n    model: b\n  b:\n    kind: count\n    model: a\n",
        ["stages.a: dependency cycle: a -> b -> a"],
    ),
    "self-reference": (
        GOOD_HEAD + "stages:\n  a:\n    kind: count\n    model: a\n",
        ["recipe.yaml:8: stages.a.model: stage 'a' cannot take itself as input"],
    ),
    "missing-local-model": (
        "name: demo\nbase:\n  model: ./no/such/folder\nstages:\n  a: {kind: count}\n",
        ["recipe.yaml:3: base.model: folder not found:"],
    ),
    "model-folder-without-weights": (
        "name: demo\nbase:\n  model: ./empty\nstages:\n  a: {kind: count}\n",
        ["recipe.yaml:3: base.model: ", "missing: config.json", "*.safetensors weights", "tokenizer.json"],
    ),
    "unknown-chat-template": (
        f"name: demo\nbase:\n  model: {TINY_MODEL}\n  chat_template: chatml-ish\nstages:\n  a: {{kind: count}}\n",
        ["recipe.yaml:4: base.chat_template: unknown chat template 'chatml-ish'"],
    ),
    "bad-dtype": (
        f"name: demo\nbase:\n  model: {TINY_MODEL}\n  dtype: fp8\nstages:\n  a: {{kind: count}}\n",
        ["recipe.yaml:4: base.dtype: must be 'auto', 'bfloat16', 'float16' or 'float32'"],
    ),
    "missing-profile": (
        GOOD_HEAD + "stages:\n  a: {kind: count}\nprofiles:\n  tiny: {}\n",
        ["recipe.yaml:7: profiles: profile 'huge' does not exist (known: tiny)"],
    ),
    "error-inside-profile": (
        GOOD_HEAD + "stages:\n  a: {kind: count}\nprofiles:\n  huge:\n    stages:\n      a:\n        steps: -x\n",
        ["recipe.yaml:11: stages.a.steps: must be a valid integer"],
    ),
    "escaping-recipe-name": (
        "name: ../../etc\n" + GOOD_HEAD.split("\n", 1)[1] + "stages:\n  a: {kind: count}\n",
        ["recipe.yaml:1: name: recipe name '../../etc' must start with a letter or digit"],
    ),
    "escaping-stage-name": (
        GOOD_HEAD + "stages:\n  ../x: {kind: count}\n",
        ["recipe.yaml:5: stages: name '../x' must start with a letter or digit"],
    ),
    "duplicate-key": (
        GOOD_HEAD + "stages:\n  a: {kind: count}\n  a: {kind: count}\n",
        ["recipe.yaml:7: stages.a: duplicate key"],
    ),
    "yaml-syntax": (
        GOOD_HEAD + "stages:\n  a: {kind: count\n",
        ["recipe.yaml:7: invalid YAML:"],
    ),
    "not-a-mapping": ("- just\n- a list\n", ["recipe.yaml:1: a recipe must be a mapping"]),
    "stage-named-base": (
        GOOD_HEAD + "stages:\n  base: {kind: count}\n",
        ["recipe.yaml:6: stages.base: stage name 'base' is taken by the base model"],
    ),
    "unknown-defaults-kind": (
        GOOD_HEAD + "defaults:\n  sfft: {}\nstages:\n  a: {kind: count}\n",
        ["recipe.yaml:6: defaults.sfft: unknown stage kind 'sfft'"],
    ),
    "bad-value-from-defaults": (
        GOOD_HEAD + "defaults:\n  count:\n    steps: lots\nstages:\n  a: {kind: count}\n",
        ["recipe.yaml:7: defaults.count.steps: must be a valid integer"],
    ),
    "empty-stages": (GOOD_HEAD + "stages: {}\n", ["recipe.yaml:5: stages: a recipe needs at least one stage"]),
    "trust-remote-code-not-bool": (
        f"name: demo\nbase:\n  model: {TINY_MODEL}\n  trust_remote_code: perhaps\nstages:\n  a: {{kind: count}}\n",
        ["recipe.yaml:4: base.trust_remote_code: must be a valid boolean"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_recipe(case, tmp_path, registry_dir, capsys):
    body, expected = CASES[case]
    (tmp_path / "empty").mkdir()
    recipe = write_recipe(tmp_path, body)
    profile = ["--profile", "huge"] if "profile" in case else []
    code = main(["validate", str(recipe), *profile])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    for fragment in expected:
        fragment = fragment.replace("recipe.yaml:", f"{recipe}:")
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    assert not registry_dir.exists()

    # `run` and `plan` refuse the same recipe the same way, before touching the registry.
    for verb in ("run", "plan"):
        assert main([verb, str(recipe), *profile]) == 2
        assert "Traceback" not in capsys.readouterr().err
        assert not registry_dir.exists()


def test_every_error_is_reported_at_once(tmp_path, capsys):
    recipe = write_recipe(tmp_path, GOOD_HEAD + "stages:\n  a:\n    kind: count\n    stesp: 3\n  b:\n    kind: nope\n  c:\n    kind: count\n    model: zzz\n")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "stages.a.stesp" in err and "stages.b.kind" in err and "stages.c.model" in err


def test_bad_override_is_reported_as_command_line(tmp_path, capsys):
    recipe = write_recipe(tmp_path, GOOD_HEAD + "stages:\n  a: {kind: count}\n")
    assert main(["validate", str(recipe), "stages.a.steps=abc", "novalue"]) == 2
    err = capsys.readouterr().err
    assert "command line: stages.a.steps: must be a valid integer" in err
    assert "command line: novalue: override 'novalue' must look like key.path=value" in err


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
