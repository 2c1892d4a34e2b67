"""`posttrain export` and `posttrain push`: a model entry out of the registry as a Hub-style folder,
and onto the Hub (a stand-in for its API, offline)."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, write_recipe
from support.hub_api import StandInHub

pytestmark = pytest.mark.slow  # the module's fixture trains a tiny SFT and evaluates it


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """base -> sft (decontaminated data) -> eval (perplexity), once for the module."""
    import posttrain

    folder = tmp_path_factory.mktemp("recipe")
    recipe = write_recipe(folder, f"""
        name: shipit
        base: {{model: {ROOT}/data/tiny-llama, chat_template: llama-3.1, dtype: float32}}
        stages:
          sft:
            kind: sft
            data:
              sources: [{{path: {ROOT}/data/sft/tiny_chat_train.jsonl, max_samples: 32}}]
              max_length: 96
              decontaminate: {{tasks: [tiny_arith_mc, tiny_arith_gen], task_dirs: [{ROOT}/data/eval/tasks]}}
            training: {{max_steps: 3, learning_rate: 1.0e-3, per_device_train_batch_size: 4, report_to: []}}
          eval:
            kind: eval
            models: [sft]
            perplexity: {{sources: [{{path: {ROOT}/data/sft/tiny_chat_dev.jsonl, max_samples: 4}}], max_length: 256}}
        """)
    registry = folder / "registry"
    result = posttrain.run(recipe, registry=registry, echo=lambda *a: None)
    return result, registry


def export(built, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    _, registry = built
    return subprocess.run([sys.executable, "-m", "posttrain.cli", "export", "shipit/sft", str(tmp_path / "out"),
                           "--registry", str(registry), *extra], capture_output=True, text=True, timeout=300)


def test_export_writes_a_folder_that_loads_with_the_same_weights_and_says_what_made_it(built, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _ = built
    done = export(built, tmp_path)
    assert done.returncode == 0, done.stderr
    out, entry = tmp_path / "out", result.entries["sft"].path
    assert {p.name for p in out.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "chat_template.jinja", "README.md", "posttrain_lineage.json"}
    for path in out.iterdir():  # copies the user owns, never the registry's bytes
        assert os.stat(path).st_ino != os.stat(entry / path.name).st_ino if (entry / path.name).exists() else True
        assert os.access(path, os.W_OK)
    exported, stored = (AutoModelForCausalLM.from_pretrained(p) for p in (out, entry))
    for (name, a), (_, b) in zip(exported.state_dict().items(), stored.state_dict().items()):
        assert torch.equal(a, b), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|start_header_id|>assistant<|end_header_id|>" in text

    card = (out / "README.md").read_text()
    evaluated = result.entries["eval"].manifest["metrics"]["results"]["sft"]["heldout/loss"]["value"]
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "**sft** (sft," in card and "**base** (model," in card and "heldout/loss" in card
    assert f"{evaluated:.4g}" in card  # the registry's eval of this very model
    assert "| sft.data | drop |" in card and "tiny_arith" in card  # decontamination summary
    assert "learning_rate: 0.001" in card  # the resolved recipe
    facts = json.loads((out / "posttrain_lineage.json").read_text())
    assert facts["model"]["key"] == result.entries["sft"].key
    assert [s["stage"] for s in facts["stages"]] == ["base", "sft.data", "sft"]
    assert facts["decontamination"]["sft.data"]["policy"] == "drop"


def test_export_can_cast_the_weights_and_the_config_says_so(built, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    assert export(built, tmp_path, "--dtype", "bfloat16").returncode == 0
    out = tmp_path / "out"
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert {handle.get_slice(n).get_dtype() for n in handle.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_export_refuses_what_it_cannot_do_in_one_line_and_writes_nothing(built, tmp_path):
    _, registry = built
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    done = export(built, tmp_path)
    assert done.returncode == 2 and "exists and is not empty" in done.stderr and "Traceback" not in done.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
    assert export(built, tmp_path, "--force").returncode == 0 and not (tmp_path / "out" / "mine.txt").exists()
    not_a_model = subprocess.run([sys.executable, "-m", "posttrain.cli", "export", "shipit/eval", str(tmp_path / "e"),
                                  "--registry", str(registry)], capture_output=True, text=True, timeout=300)
    assert not_a_model.returncode == 2 and "is an eval entry, not a model" in not_a_model.stderr
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.export-*"))
    inside = subprocess.run([sys.executable, "-m", "posttrain.cli", "export", "shipit/sft", str(registry / "x"),
                             "--registry", str(registry)], capture_output=True, text=True, timeout=300)
    assert inside.returncode == 2 and "inside the registry" in inside.stderr


def test_the_stand_in_hub_accepts_only_what_huggingface_hub_accepts():
    """A call that the stand-in answers is a call the real HfApi takes (names and kinds of parameters)."""
    from huggingface_hub import HfApi

    for name in ("create_repo", "list_repo_files", "create_branch", "upload_folder"):
        real = inspect.signature(getattr(HfApi, name)).parameters
        for parameter in inspect.signature(getattr(StandInHub, name)).parameters.values():
            assert parameter.name in real and real[parameter.name].kind == parameter.kind, (name, parameter.name)


def test_push_creates_the_repo_uploads_the_export_and_never_overwrites_unasked(built, tmp_path, monkeypatch):
    from posttrain import cli

    _, registry = built
    hub = StandInHub(tmp_path / "hub")
    monkeypatch.setattr("huggingface_hub.HfApi", lambda *a, **k: hub)
    argv = ["push", "shipit/sft", "me/tiny-instruct", "--registry", str(registry)]
    assert cli.main(argv + ["--private"]) == 0
    repo = tmp_path / "hub" / "me" / "tiny-instruct" / "main"
    assert hub.private["me/tiny-instruct"] is True
    assert {"model.safetensors", "config.json", "README.md", "posttrain_lineage.json", "chat_template.jinja",
            ".gitattributes"} <= {p.name for p in repo.iterdir()}
    assert "posttrain: shipit/sft" in hub.calls[-1][2]["message"]

    (repo / "model-00002-of-00002.safetensors").write_text("a stale shard of an older upload")
    assert cli.main(argv) == 2  # the repo holds a model: refused, nothing uploaded
    assert hub.calls[-1][0] == "list_repo_files"
    assert cli.main(argv + ["--overwrite"]) == 0
    assert not (repo / "model-00002-of-00002.safetensors").exists() and (repo / "model.safetensors").exists()

    assert cli.main(argv + ["--revision", "candidate-2"]) == 0  # a new branch: created from main, then pushed
    assert ("create_branch", "me/tiny-instruct", {"branch": "candidate-2"}) in hub.calls
    assert (tmp_path / "hub" / "me" / "tiny-instruct" / "candidate-2" / "model.safetensors").exists()


def test_push_errors_are_one_line_each(built, tmp_path, monkeypatch, capsys):
    from posttrain import cli

    _, registry = built
    hub = StandInHub(tmp_path / "hub", writable={"me/other"})
    monkeypatch.setattr("huggingface_hub.HfApi", lambda *a, **k: hub)
    assert cli.main(["push", "shipit/sft", "them/model", "--registry", str(registry)]) == 2
    assert "refused the push to them/model (HTTP 403)" in capsys.readouterr().err
    assert cli.main(["push", "shipit/sft", "no-owner", "--registry", str(registry)]) == 2
    assert "as ORG/NAME" in capsys.readouterr().err
    calls = len(hub.calls)
    assert cli.main(["push", "shipit/eval", "me/other", "--registry", str(registry)]) == 2
    assert "not a model" in capsys.readouterr().err and len(hub.calls) == calls  # refused before any Hub call
