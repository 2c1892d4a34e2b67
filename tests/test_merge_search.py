"""Merge searches and combined dev objectives (issue 27): a selection ranks candidates on several eval
metrics at once, gates read that objective for any model and compare with lists of models, a sweep's
named variants may change a merge's method and models, and the flagship searches 16 merges."""
from __future__ import annotations

import pytest
import yaml

from conftest import ROOT, TINY_MODEL, cli, write_recipe
from posttrain.core.errors import UserError
from posttrain.evaluation.gates import Objective, metric_value
from posttrain.evaluation.objective import Part, combine, part_values
from posttrain.recipe.load import load_recipe
from posttrain.recipe.sweeps import SweepSpec, expand

FLAGSHIP = ROOT / "recipes" / "intellect1_instruct.yaml"
TRAIN = ROOT / "data" / "sft" / "tiny_chat_train.jsonl"
DEV = ROOT / "data" / "sft" / "tiny_chat_dev.jsonl"
PREFS = ROOT / "data" / "dpo" / "tiny_compare_dev.jsonl"

LOSS = Part("dev", "heldout/loss", "min", 1.0)
ACCURACY = Part("dev", "preference/accuracy", "max", 2.0)
VALUES = {"a": {"dev/heldout/loss": 1.5, "dev/preference/accuracy": 0.6},
          "b": {"dev/heldout/loss": 2.5, "dev/preference/accuracy": 0.9},
          "c": {"dev/heldout/loss": 1.7, "dev/preference/accuracy": 0.8},
          "d": {"dev/heldout/loss": 1.7, "dev/preference/accuracy": None}}


def test_a_score_is_the_signed_weighted_sum_of_its_parts():
    scores = combine([LOSS, ACCURACY], "score", VALUES)
    # -loss + 2 x accuracy, by hand in float64
    assert scores["a"] == pytest.approx(-1.5 + 1.2, abs=1e-12)
    assert scores["b"] == pytest.approx(-2.5 + 1.8, abs=1e-12)
    assert scores["c"] == pytest.approx(-1.7 + 1.6, abs=1e-12)
    assert scores["d"] is None  # a missing part: no objective, ranked last


def test_a_rank_objective_is_the_weighted_mean_place_with_shared_places_for_ties():
    values = {**VALUES, "d": {"dev/heldout/loss": 1.5, "dev/preference/accuracy": 0.6}}  # ties a on both
    ranks = combine([LOSS, ACCURACY], "rank", values)
    # loss places: a, d tie for 1-2 (1.5 each), c 3, b 4; accuracy places: b 1, c 2, a, d tie for 3-4 (3.5)
    assert ranks["a"] == pytest.approx((1 * 1.5 + 2 * 3.5) / 3)
    assert ranks["b"] == pytest.approx((1 * 4 + 2 * 1) / 3)
    assert ranks["c"] == pytest.approx((1 * 3 + 2 * 2) / 3)
    assert ranks["a"] == ranks["d"]


def test_one_metric_is_its_own_value():
    assert combine([LOSS], "metric", VALUES)["c"] == 1.7
    results = {"dev": {"m": {"heldout/loss": {"value": 2.0}}}}
    assert part_values([LOSS], results, ["m", "n"]) == {"m": {"dev/heldout/loss": 2.0},
                                                        "n": {"dev/heldout/loss": None}}


class _Entry:
    def __init__(self, kind, metrics):
        self.kind, self.manifest = kind, {"metrics": metrics}


def _entries():
    def res(loss, accuracy):
        return {"heldout/loss": {"value": loss}, "preference/accuracy": {"value": accuracy}}

    return {"dev": _Entry("eval", {"results": {"merged[x]": res(1.6, 0.8), "merged[y]": res(1.9, 0.85),
                                               "sft.best": res(1.5, 0.6), "dpo.best": res(2.5, 0.9)}})}


def test_gates_read_a_selections_objective_for_any_model_and_aggregate_over_listed_models():
    objectives = {"merged.best": Objective([LOSS, ACCURACY], "score", "merged[x]")}
    entries = _entries()
    assert metric_value("merged.best/objective", entries, objectives) == pytest.approx(-1.6 + 1.6)
    assert metric_value("merged.best/objective/dpo.best", entries, objectives) == pytest.approx(-2.5 + 1.8)
    assert metric_value("max(merged.best/objective/{sft.best,dpo.best})", entries, objectives) == \
        pytest.approx(max(-1.5 + 1.2, -2.5 + 1.8))
    assert metric_value("min(dev/{sft.best, dpo.best}/heldout/loss)", entries, objectives) == 1.5
    # A select step in an eval that evaluated its candidates reads as the one it chose.
    assert metric_value("dev/merged.best/heldout/loss", entries, objectives) == 1.6
    with pytest.raises(UserError, match=r"a list of models needs mean\(...\), min\(...\) or max\(...\)"):
        metric_value("dev/{sft.best,dpo.best}/heldout/loss", entries, objectives)
    with pytest.raises(UserError, match="no dev/heldout/loss, dev/preference/accuracy for 'base'"):
        metric_value("merged.best/objective/base", entries, objectives)
    ranked = {"merged.best": Objective([LOSS, ACCURACY], "rank", "merged[x]")}
    with pytest.raises(UserError, match="a rank objective has no value outside its ranking"):
        metric_value("merged.best/objective/sft.best", entries, ranked)


def test_named_variants_label_their_candidates_and_a_null_drops_one():
    spec = SweepSpec(variants={"ties_even": {"method": "ties"}, "slerp 05": {"method": "slerp"}, "gone": None})
    assert expand(spec) == [("ties_even", {"method": "ties"}), ("slerp_05", {"method": "slerp"})]
    with pytest.raises(ValueError, match="needs `grid` and/or `variants`"):
        SweepSpec(variants={"gone": None})


def test_merge_weights_are_a_shorthand_for_each_models_weight():
    from posttrain.kinds.merge.stage import MergeConfig

    short = MergeConfig.model_validate({"method": "ties", "models": ["a", {"model": "b"}], "weights": [0.3, 0.7],
                                        "parameters": {"density": 0.5}})
    long = MergeConfig.model_validate({"method": "ties", "parameters": {"density": 0.5},
                                       "models": [{"model": "a", "parameters": {"weight": 0.3}},
                                                  {"model": "b", "parameters": {"weight": 0.7}}]})
    assert short.model_dump(mode="json") == long.model_dump(mode="json")  # so the same key
    with pytest.raises(ValueError, match="`weights` has 1 values for 2 models"):
        MergeConfig.model_validate({"method": "linear", "models": ["a", "b"], "weights": [1.0]})
    with pytest.raises(ValueError, match="model 0 has a weight under its parameters and in `weights`"):
        MergeConfig.model_validate({"method": "linear", "weights": [1.0],
                                    "models": [{"model": "a", "parameters": {"weight": 2.0}}]})


def _search_recipe(folder, selection):
    body = {
        "name": "search", "base": {"model": str(TINY_MODEL), "chat_template": "llama-3.1"},
        "stages": {
            "sft": {"kind": "sft", "data": {"sources": [{"path": str(TRAIN)}], "max_length": 96},
                    "training": {"max_steps": 2, "report_to": []}},
            "other": {"kind": "sft", "data": {"sources": [{"path": str(TRAIN)}], "max_length": 96},
                      "training": {"max_steps": 3, "report_to": []}},
            "merged": {"kind": "merge", "method": "linear", "base_model": "sft",
                       "models": [{"model": "sft"}, {"model": "other"}],
                       "sweep": {"variants": {"even": {"weights": [0.5, 0.5]},
                                              "slerp": {"method": "slerp", "parameters": {"t": 0.5}}}}},
            "dev": {"kind": "eval", "models": ["merged", "sft"], "perplexity": {"sources": [{"path": str(DEV)}]},
                    "preference": {"sources": [{"path": str(PREFS)}]}},
            "final": {"kind": "eval", "models": [selection], "perplexity": {"sources": [{"path": str(DEV)}]}},
        }}
    return write_recipe(folder, yaml.safe_dump(body, sort_keys=False))


@pytest.mark.parametrize("by,extra,where,message", [
    ([{"metric": "dev/heldout/loss", "mode": "min"}, {"metric": "dev/generation/exact_match", "mode": "max"}], {},
     "stages.final.models.0.by.1.metric", "eval stage 'dev' does not measure 'generation/exact_match'"),
    ([{"metric": "nowhere/heldout/loss", "mode": "min"}], {}, "stages.final.models.0.by.0.metric",
     "'nowhere' is not an eval stage"),
    ([{"metric": "dev/heldout/loss", "mode": "min"}], {"mode": "min"}, "stages.final.models.0",
     "each part has its own `mode`"),
    ("dev/heldout/loss", {"mode": "min", "combine": "rank"}, "stages.final.models.0", "`combine` joins several metrics"),
    ([{"metric": "dev/heldout/loss", "mode": "min", "weight": 0}], {}, "stages.final.models.0.by.0.weight",
     "greater than 0"),
])
@pytest.mark.slow
def test_a_combined_selection_that_cannot_be_made_is_a_located_validate_error(tmp_path, by, extra, where, message):
    path = _search_recipe(tmp_path, {"best_of": "merged", "by": by, **extra})
    result = cli("validate", str(path))
    assert result.returncode == 2, result.stdout
    line = next((line for line in result.stderr.splitlines() if where in line), result.stderr)
    assert line.startswith(f"{path}:") and message in line, result.stderr


def test_variants_may_change_a_merges_method_and_models(tmp_path):
    by = [{"metric": "dev/heldout/loss", "mode": "min"}, {"metric": "dev/preference/accuracy", "mode": "max"}]
    loaded = load_recipe(_search_recipe(tmp_path, {"best_of": "merged", "by": by, "combine": "rank"}))
    assert loaded.stages["merged[even]"].config.method == "linear"
    assert [m.parameters for m in loaded.stages["merged[even]"].config.models] == [{"weight": 0.5}, {"weight": 0.5}]
    assert loaded.stages["merged[slerp]"].config.method == "slerp"
    select = loaded.stages["merged.best"].config
    assert select.combine == "rank" and select.mode == "min" and select.evals == ["dev"]
    assert [p.metric for p in select.parts] == ["heldout/loss", "preference/accuracy"]


@pytest.mark.slow
def test_the_flagship_searches_16_merges_offline_and_the_tiny_profile_8():
    plan = cli("plan", str(FLAGSHIP))
    assert plan.returncode == 0, plan.stderr
    listed = [line.split()[0] for line in plan.stdout.split("memory estimates")[0].splitlines()[1:-1]]
    merges = [name for name in listed if name.startswith("merged[")]
    assert len(merges) == 16
    methods = {load_recipe(FLAGSHIP).stages[name].config.method for name in merges}
    assert {"linear", "ties", "dare_ties", "della", "task_arithmetic", "model_stock", "slerp"} <= methods
    assert "place 1 of 16 merged candidates by score(merge_dev/heldout/loss min x1, " \
           "merge_dev/preference/accuracy max x2)" in plan.stdout
    tiny = load_recipe(FLAGSHIP, "tiny")
    assert len([n for n in tiny.order if n.startswith("merged[")]) == 8
    # Every candidate is its own entry, over the chosen SFT and DPO models (selections inside variants).
    assert set(tiny.stages["merged[slerp_dpo_05]"].inputs.values()) == {"sft.best", "dpo.best"}
    assert tiny.stages["merged[ties_even]"].inputs["base_model"] == "sft.best"


def test_the_report_shows_each_part_and_the_objective_of_every_candidate():
    from posttrain.report import Report, candidate_lines

    def entry(stage, overrides, config):
        return type("E", (), {"kind": "merge", "manifest": {"candidate": {"of": "merged", "label": stage,
                                                                          "overrides": overrides},
                                                            "config": config, "stage": stage}})()

    record = {"step": "merged.best", "of": "merged", "chosen": "merged[b]", "combine": "score",
              "scores": {"merged[a]": -0.5, "merged[b]": -0.2}}
    final = type("E", (), {"kind": "eval", "manifest": {"selections": {"models.0": record}, "config": {}}})()
    report = Report("t", {"merged[a]": entry("merged[a]", {"method": "ties"}, {"method": "ties"}),
                          "merged[b]": entry("merged[b]", {"weights": [1, 2]}, {"method": "linear"}),
                          "final": final},
                    rows={"dev: heldout/loss": {"merged[a]": {"value": 1.7}, "merged[b]": {"value": 1.6}}},
                    chosen={"merged.best": "merged[b]"})
    lines = candidate_lines(report)
    assert lines[2] == "| candidate | method | weights | dev: heldout/loss | merged.best score | chosen as |"
    assert lines[4] == "| merged[a] | ties | - | 1.7 | -0.5 |  |"
    assert lines[5] == "| merged[b] | linear | [1, 2] | 1.6 | -0.2 | **merged.best** |"
