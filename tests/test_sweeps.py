"""Sweeps, selections and soups (issue 14): a stage expands into candidates, an eval ranks them, a
selection takes the best (or top k) on, and what follows is keyed by the chosen entries alone."""
from __future__ import annotations

import pytest
import yaml

import posttrain
from conftest import ROOT, TINY_MODEL, cli, write_recipe
from posttrain.core.errors import RecipeError
from posttrain.recipe.load import load_recipe
from posttrain.recipe.sweeps import SweepSpec, expand, rank_candidates

TRAIN = ROOT / "data" / "sft" / "tiny_chat_train.jsonl"
DEV = ROOT / "data" / "sft" / "tiny_chat_dev.jsonl"


def recipe(folder, rates=(3e-3, 1e-9), extra_stages=None, name="sweep"):
    """SFT swept over learning rates (1e-9 barely moves: it always loses), ranked on dev loss; the best
    goes to a second SFT, the top 2 to a merge."""
    body = {
        "name": name, "base": {"model": str(TINY_MODEL), "chat_template": "llama-3.1"},
        "stages": {
            "sft": {"kind": "sft", "data": {"sources": [{"path": str(TRAIN)}], "max_length": 96},
                    "training": {"max_steps": 6, "per_device_train_batch_size": 16, "lr_scheduler_type": "constant",
                                 "report_to": []},
                    "sweep": {"grid": {"training.learning_rate": list(rates)}}},
            "dev": {"kind": "eval", "models": ["sft"], "perplexity": {"sources": [{"path": str(DEV)}]}},
            "more": {"kind": "sft", "model": {"best_of": "sft", "by": "dev/heldout/loss", "mode": "min"},
                     "data": {"sources": [{"path": str(TRAIN)}], "max_length": 96},
                     "training": {"max_steps": 2, "per_device_train_batch_size": 16, "report_to": []}},
            "soup": {"kind": "merge", "method": "linear", "parameters": {"weight": 1.0},
                     "models": {"top_k": 2, "of": "sft", "by": "dev/heldout/loss", "mode": "min"}},
            **(extra_stages or {}),
        }}
    return write_recipe(folder, yaml.safe_dump(body, sort_keys=False))


def test_a_grid_and_variants_expand_into_labelled_candidates():
    spec = SweepSpec(grid={"training.learning_rate": [1e-5, 2e-5], "seed": [1, 2]},
                     variants=[{"training.learning_rate": 5e-6, "seed": 3}])
    labels = [label for label, _ in expand(spec)]
    assert labels == ["learning_rate=1e-05,seed=1", "learning_rate=1e-05,seed=2", "learning_rate=2e-05,seed=1",
                      "learning_rate=2e-05,seed=2", "learning_rate=5e-06,seed=3"]
    # Two keys with the same last part keep their whole names.
    clash = expand(SweepSpec(grid={"training.seed": [1], "seed": [2]}))
    assert clash[0][0] == "training.seed=1,seed=2"


@pytest.mark.slow
def test_the_flagship_plan_lists_its_candidates_offline():
    plan = cli("plan", str(ROOT / "recipes" / "intellect1_instruct.yaml"))
    assert plan.returncode == 0, plan.stderr
    names = [line.split()[0] for line in plan.stdout.split("memory estimates")[0].splitlines()[1:-1]]
    assert [n for n in names if n.startswith("sft[")] == [
        "sft[learning_rate=1e-05,seed=1]", "sft[learning_rate=1e-05,seed=2]",
        "sft[learning_rate=2e-05,seed=1]", "sft[learning_rate=2e-05,seed=2]"]
    assert len([n for n in names if n.startswith("dpo[")]) == 4 and {"sft.best", "dpo.best"} <= set(names)
    assert "once sft_dev has run" in plan.stdout


@pytest.mark.parametrize("stage_patch,where,message", [
    ({"sweep": {"grid": {"data.overlong": ["cut"]}}}, "stages.sft.sweep.grid.data.overlong", "'truncate' or 'drop'"),
    ({"sweep": {"grid": {"lora.rank": [4]}}}, "stages.sft.sweep.grid.lora.rank", "unknown key"),
    ({"sweep": {"grid": {"seed": list(range(20))}}}, "stages.sft.sweep", "more than max_candidates 16"),
    ({"sweep": {"grid": {}}}, "stages.sft.sweep", "needs `grid` and/or `variants`"),
])
@pytest.mark.slow
def test_validate_checks_every_swept_key_where_it_is_written(tmp_path, stage_patch, where, message):
    path = recipe(tmp_path)
    body = yaml.safe_load(path.read_text())
    body["stages"]["sft"].update(stage_patch)
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    result = cli("validate", str(path))
    assert result.returncode == 2
    line = next(line for line in result.stderr.splitlines() if where in line)
    assert line.startswith(f"{path}:") and message in line, result.stderr


@pytest.mark.parametrize("selection,message", [
    ({"best_of": "sft", "by": "dev/heldout/accuracy", "mode": "min"},
     "eval stage 'dev' does not measure 'heldout/accuracy' (it measures: heldout/loss, heldout/perplexity)"),
    ({"best_of": "sft", "by": "nowhere/heldout/loss", "mode": "min"}, "'nowhere' is not an eval stage"),
    ({"best_of": "more", "by": "dev/heldout/loss", "mode": "min"}, "'more' is not a swept stage"),
    ({"top_k": 2, "of": "sft", "by": "dev/heldout/loss", "mode": "min"}, "top_k gives several models"),
])
@pytest.mark.slow
def test_a_selection_that_cannot_be_made_is_a_validate_error(tmp_path, selection, message):
    path = recipe(tmp_path)
    body = yaml.safe_load(path.read_text())
    body["stages"]["more"]["model"] = selection
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    result = cli("validate", str(path))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert f"{path}:" in result.stderr


def test_a_swept_stage_taken_without_a_selection_is_an_error(tmp_path):
    path = recipe(tmp_path)
    body = yaml.safe_load(path.read_text())
    body["stages"]["more"]["model"] = "sft"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    with pytest.raises(RecipeError, match=r"stages.more.model: stage 'sft' is swept into 2 candidates: take one "
                                          r"with \{best_of: sft"):
        load_recipe(path)


def test_ties_keep_the_sweep_order():
    assert rank_candidates({"a": 1.0, "b": 0.5, "c": 0.5, "d": None}, "min") == ["b", "c", "a", "d"]
    assert rank_candidates({"a": 1.0, "b": 2.0, "c": 2.0}, "max") == ["b", "c", "a"]


@pytest.mark.slow
def test_select_best_and_top_k_then_a_losing_candidate_changes_nothing_downstream(tmp_path, registry_dir):
    first = posttrain.run(recipe(tmp_path))
    strong, weak = "sft[learning_rate=0.003]", "sft[learning_rate=1e-09]"
    assert first.selections["sft.best"]["chosen"] == strong
    assert [first.selections[f"sft.top{i}"]["chosen"] for i in (1, 2)] == [strong, weak]
    assert first.entries["more"].manifest["inputs"]["model"] == first.entries[strong].key
    recorded = first.entries["more"].manifest["selections"]["model"]
    assert recorded["chosen"] == strong and set(recorded["scores"]) == {strong, weak}
    assert first.entries[strong].manifest["candidate"] == {"of": "sft", "label": "learning_rate=0.003",
                                                            "overrides": {"training.learning_rate": 0.003}}
    # One more (losing) value: one new candidate; the prepared data, the other candidates, the stage
    # on the best one and the top-2 soup are all reused. The eval runs again (its model list grew) but
    # evaluates only the new candidate.
    second = posttrain.run(recipe(tmp_path, rates=(3e-3, 1e-9, 1e-10)))
    trained = [n for n in second.ran if second.recipe.stages[n].kind == "sft"]
    assert trained == ["sft[learning_rate=1e-10]"]
    assert second.metrics("dev")["reused_results"] == [strong, weak]
    assert second.metrics("dev")["results"][strong] == first.metrics("dev")["results"][strong]
    assert {"more", "soup", "sft.data", strong, weak} <= set(second.cached)
    assert second.entries["soup"].key == first.entries["soup"].key
    # The report sets the candidates side by side and marks the chosen ones.
    report = cli("report", str(recipe(tmp_path, rates=(3e-3, 1e-9, 1e-10))), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Candidates" in text and f"| {strong} | 0.003 |" in text and "**sft.best**" in text
    assert (tmp_path / "report" / "sweep-sft.png").stat().st_size > 0


def test_gates_take_the_mean_of_a_sweeps_candidates(tmp_path):
    from posttrain.evaluation.gates import metric_value

    class Entry:
        kind = "eval"
        manifest = {"metrics": {"results": {"sft[seed=1]": {"heldout/loss": {"value": 2.0}},
                                            "sft[seed=2]": {"heldout/loss": {"value": 3.0}},
                                            "soup": {"heldout/loss": {"value": 2.2}}}}}

    entries = {"eval": Entry()}
    assert metric_value("mean(eval/sft/heldout/loss)", entries) == 2.5
    assert metric_value("min(eval/sft/heldout/loss)", entries) == 2.0
    assert metric_value("eval/soup/heldout/loss", entries) == 2.2


@pytest.mark.slow
def test_a_merge_weight_search_is_a_sweep_of_the_merge_ranked_by_a_dev_eval(tmp_path):
    """Each weight trial is its own cached entry; max_candidates is the budget; best_of takes the winner."""
    path = recipe(tmp_path, extra_stages={
        "blend": {"kind": "merge", "method": "linear", "base_model": "sft.top1", "parameters": {"weight": 0.5},
                  "models": {"top_k": 2, "of": "sft", "by": "dev/heldout/loss", "mode": "min"},
                  "sweep": {"grid": {"models.0.parameters.weight": [0.9, 0.1]}, "max_candidates": 2}},
        "blend_dev": {"kind": "eval", "models": ["blend"], "perplexity": {"sources": [{"path": str(DEV)}]}},
        "final": {"kind": "eval", "models": [{"best_of": "blend", "by": "blend_dev/heldout/loss", "mode": "min"}],
                  "perplexity": {"sources": [{"path": str(DEV)}]}},
    })
    body = yaml.safe_load(path.read_text())
    for name in ("more", "soup"):
        body["stages"].pop(name)
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    result = posttrain.run(path)
    trials = [n for n in result.recipe.order if n.startswith("blend[")]
    assert trials == ["blend[weight=0.9]", "blend[weight=0.1]"]
    assert len({result.entries[n].key for n in trials}) == 2
    # 0.9 on the well-trained candidate (place 1) beats 0.1, which leans on the one that barely trained.
    assert result.selections["blend.best"]["chosen"] == "blend[weight=0.9]"
    assert "blend.best" in result.metrics("final")["results"]
