"""The eval stage: lm-eval on local tasks offline, built-in metrics, stable numbers, keys that follow inputs."""
from __future__ import annotations

import pytest

import json

import yaml

import posttrain
from conftest import ROOT, TINY_MODEL, write_recipe
from posttrain.cli import main

TASKS = ROOT / "data" / "eval" / "tasks"
HELDOUT = ROOT / "data" / "sft" / "tiny_chat_heldout.jsonl"


def eval_recipe(folder, **extra):
    stage = {"kind": "eval", "models": ["base"], "tasks": ["tiny_arith_mc", "tiny_arith_gen"],
             "task_dirs": [str(TASKS)], "limit": 8,
             "perplexity": {"sources": [{"path": str(HELDOUT), "max_samples": 16}]},
             "exact_match": {"data": {"sources": [{"path": str(HELDOUT), "max_samples": 4}]}, "max_new_tokens": 4},
             **extra}
    body = {"name": "evaltest", "base": {"model": str(TINY_MODEL), "chat_template": "llama-3.1"},
            "stages": {"eval": stage}}
    return write_recipe(folder, yaml.safe_dump(body, sort_keys=False))


@pytest.mark.slow
def test_local_eval_gives_the_same_numbers_twice_and_stores_them(tmp_path, monkeypatch):
    first_dir, second_dir = tmp_path / "one", tmp_path / "two"
    first_dir.mkdir(), second_dir.mkdir()
    runs = []
    for folder in (first_dir, second_dir):
        monkeypatch.setenv("POSTTRAIN_REGISTRY", str(folder / "registry"))
        runs.append(posttrain.run(eval_recipe(folder)))
    a, b = (r.metrics("eval")["results"]["base"] for r in runs)
    assert a == b
    assert set(a) == {"tiny_arith_mc/acc", "tiny_arith_gen/exact_match", "heldout/loss", "heldout/perplexity",
                      "generation/exact_match"}
    assert 0 <= a["tiny_arith_mc/acc"]["value"] <= 1 and a["tiny_arith_mc/acc"]["stderr"] is not None
    assert a["heldout/perplexity"]["value"] > 1
    stored = json.loads((runs[0].path("eval") / "results.json").read_text())
    assert stored["base"] == a


@pytest.mark.slow
def test_eval_key_covers_the_evaluated_entries(tmp_path, capsys):
    recipe = eval_recipe(tmp_path, tasks=[], task_dirs=[])
    posttrain.run(recipe)
    capsys.readouterr()
    assert main(["plan", str(recipe), "base.dtype=float32"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("eval "))
    assert "run" in line and "input models.0 (base) changed" in line


@pytest.mark.slow
def test_unknown_task_is_one_clear_error(tmp_path, capsys):
    assert main(["run", str(eval_recipe(tmp_path, tasks=["no_such_task_xyz"]))]) == 2
    err = capsys.readouterr().err
    assert "no_such_task_xyz" in err and "Traceback" not in err


def test_nothing_to_evaluate_is_a_validation_error(tmp_path, capsys):
    body = yaml.safe_load(eval_recipe(tmp_path).read_text())
    stage = body["stages"]["eval"]
    for key in ("tasks", "perplexity", "exact_match"):
        stage.pop(key)
    recipe = write_recipe(tmp_path, yaml.safe_dump(body))
    assert main(["validate", str(recipe)]) == 2
    assert "stages.eval.tasks: nothing to evaluate" in capsys.readouterr().err


@pytest.mark.slow
def test_the_vllm_backend_runs_lm_evals_own_vllm_model_and_gives_the_hf_backends_results(tmp_path, monkeypatch):
    """`backend: vllm` end to end through lm-eval's unchanged `vllm` model, on tests/fakes/vllm (vLLM's
    offline API answered by the transformers model): log-likelihood and generation tasks give the HF
    backend's numbers in the same layout, and the tensor-parallel setting reaches vllm.LLM."""
    import sys

    def forget_vllm():
        for name in [m for m in sys.modules if m == "vllm" or m.startswith(("vllm.", "lm_eval.models.vllm"))]:
            del sys.modules[name]

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "fakes"))
    forget_vllm()
    import vllm

    tasks = {"kind": "eval", "models": ["base"], "tasks": ["tiny_arith_mc", "tiny_arith_gen"],
             "task_dirs": [str(TASKS)], "limit": 8}
    body = {"name": "evaltest", "base": {"model": str(TINY_MODEL), "chat_template": "llama-3.1"},
            "stages": {"on_hf": tasks, "on_vllm": {**tasks, "backend": "vllm",
                                                   "vllm": {"tensor_parallel_size": 4, "gpu_memory_utilization": 0.5}}}}
    result = posttrain.run(write_recipe(tmp_path, yaml.safe_dump(body, sort_keys=False)))
    hf, served = (result.metrics(stage)["results"]["base"] for stage in ("on_hf", "on_vllm"))
    assert set(hf) == set(served) == {"tiny_arith_mc/acc", "tiny_arith_gen/exact_match"}
    for metric in hf:
        assert served[metric]["value"] == pytest.approx(hf[metric]["value"]), metric
    assert vllm.created[-1]["tensor_parallel_size"] == 4 and vllm.created[-1]["gpu_memory_utilization"] == 0.5
    forget_vllm()  # the stand-in must not outlive the test


def test_the_vllm_backend_without_tasks_is_a_located_error(tmp_path, capsys):
    recipe = eval_recipe(tmp_path, tasks=[], task_dirs=[], backend="vllm")
    assert main(["validate", str(recipe)]) == 2
    assert "stages.eval.backend: the vllm backend runs lm-eval `tasks`" in capsys.readouterr().err


@pytest.mark.slow
def test_the_vllm_backend_without_vllm_says_how_to_install_it(tmp_path, capsys):
    recipe = eval_recipe(tmp_path, backend="vllm", perplexity=None, exact_match=None)
    assert main(["run", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert "pip install 'posttrain[vllm]'" in err and "Traceback" not in err
