"""The merge stage: mergekit's result exactly, the formula for linear, a chat-ready output."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import posttrain
from conftest import ROOT, TINY_MODEL, write_recipe
from posttrain.cli import main

TRAIN = ROOT / "data" / "sft" / "tiny_chat_train.jsonl"


def sft(seed: int, samples: int) -> dict:
    return {"kind": "sft", "seed": seed,
            "data": {"sources": [{"path": str(TRAIN), "max_samples": samples}], "max_length": 96},
            "training": {"max_steps": 30, "per_device_train_batch_size": 16, "learning_rate": 3e-3,
                         "lr_scheduler_type": "constant"}}


def merge_recipe(folder: Path, merge: dict) -> Path:
    body = {"name": "mergetest", "base": {"model": str(TINY_MODEL), "chat_template": "llama-3.1"},
            "stages": {"a": sft(1, 200), "b": sft(2, 150), "merged": {"kind": "merge", **merge}}}
    return write_recipe(folder, yaml.safe_dump(body, sort_keys=False))


LINEAR = {"method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.3}},
                                         {"model": "b", "parameters": {"weight": 0.7}}]}
TIES = {"method": "ties", "base_model": "base", "parameters": {"density": 0.6},
        "models": [{"model": "a", "parameters": {"weight": 0.5}}, {"model": "b", "parameters": {"weight": 0.8}}]}
DARE = {**TIES, "method": "dare_ties"}  # stochastic: equal only if the random seed is handled alike


def weights(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(file))
    return found


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    import os

    folder = tmp_path_factory.mktemp("merge")
    os.environ["POSTTRAIN_REGISTRY"] = str(folder / "registry")
    try:
        return posttrain.run(merge_recipe(folder, LINEAR)), folder
    finally:
        del os.environ["POSTTRAIN_REGISTRY"]


@pytest.mark.slow
def test_linear_merge_is_the_weighted_average(linear):
    result, _ = linear
    a, b, merged = weights(result.path("a")), weights(result.path("b")), weights(result.path("merged"))
    assert set(merged) == set(a)
    for name in a:
        torch.testing.assert_close(merged[name], 0.3 * a[name] + 0.7 * b[name], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("merge", [LINEAR, TIES, DARE], ids=["linear", "ties", "dare_ties"])
def test_merge_equals_mergekit_yaml_bitwise(linear, merge, tmp_path):
    result, folder = linear
    import os

    os.environ["POSTTRAIN_REGISTRY"] = str(folder / "registry")
    try:
        ours = posttrain.run(merge_recipe(folder, merge))
    finally:
        del os.environ["POSTTRAIN_REGISTRY"]
    paths = {"a": str(ours.path("a")), "b": str(ours.path("b")), "base": str(ours.path("base"))}
    config = {"merge_method": merge["method"], "base_model": paths[merge.get("base_model", "a")],
              "models": [{"model": paths[m["model"]], "parameters": m["parameters"]} for m in merge["models"]],
              "tokenizer_source": "base"}
    if "parameters" in merge:
        config["parameters"] = merge["parameters"]
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    cli = Path(sys.executable).parent / "mergekit-yaml"
    subprocess.run([str(cli), str(cfg), str(out), "--random-seed", "42", "--no-write-model-card"], check=True,
                   capture_output=True)
    theirs, mine = weights(out), weights(ours.path("merged"))
    assert set(theirs) == set(mine)
    for name in theirs:
        assert torch.equal(theirs[name], mine[name]), name


@pytest.mark.slow
def test_merged_model_loads_chats_and_stops_at_eot(linear):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _ = linear
    path = result.path("merged")
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "<|eot_id|>" and tok.chat_template == AutoTokenizer.from_pretrained(result.path("a")).chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 4?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=30, do_sample=False)[0, prompt["input_ids"].shape[1]:].tolist()
    assert out[-1] == tok.convert_tokens_to_ids("<|eot_id|>") and len(out) < 30
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == tok.convert_tokens_to_ids("<|eot_id|>")
    card = (path / "README.md").read_text()
    assert "merge" in card and "Lineage" in card and "huggingface.co" not in card
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["metrics"]["donor"] == result.entries["a"].key  # default donor: the first model


def test_merge_errors_are_mapped_to_recipe_keys(tmp_path, capsys):
    bad = {"method": "ties", "base_model": "base", "parameters": {"densty": 0.5},
           "models": [{"model": "a"}, {"model": "b", "parameters": {"weight": 1.0}}]}
    assert main(["validate", str(merge_recipe(tmp_path, bad))]) == 2
    err = capsys.readouterr().err
    assert "stages.merged.parameters.densty: ties has no parameter 'densty'" in err
    assert "stages.merged.models.0.parameters: ties needs `weight` for every model" in err
    assert main(["validate", str(merge_recipe(tmp_path, {**LINEAR, "method": "lienar"}))]) == 2
    assert "stages.merged.method: unknown merge method 'lienar'" in capsys.readouterr().err
    assert main(["validate", str(merge_recipe(tmp_path, {**LINEAR, "models": [{"model": "zz"}]}))]) == 2
    assert "stages.merged.models.0.model: refers to 'zz'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_warm_validate_reuses_the_merge_check_without_importing_mergekit(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bad = {"method": "ties", "base_model": "base", "parameters": {"densty": 0.5},
           "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 1.0}}]}
    recipe = merge_recipe(tmp_path, bad)
    probe = ("import sys; from posttrain.cli import main; rc = main(['validate', sys.argv[1]]); "
             "print('imported mergekit' if 'mergekit' in sys.modules else 'no mergekit', rc)")
    runs = [subprocess.run([sys.executable, "-c", probe, str(recipe)], capture_output=True, text=True) for _ in range(2)]
    assert [r.stdout.split()[-3:] for r in runs] == [["imported", "mergekit", "2"], ["no", "mergekit", "2"]]
    assert all("stages.merged.parameters.densty: ties has no parameter 'densty'" in r.stderr for r in runs)
