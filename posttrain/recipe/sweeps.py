"""Sweeps and selections: a stage run as several candidates, and the best (or top k) of them taken on.

`sweep:` on a stage expands into candidates, each its own stage (and registry entry and ref), named
`<stage>[<label>]`, e.g. `sft[learning_rate=1e-05,seed=1]`:

    sweep:
      grid: {training.learning_rate: [1.0e-5, 2.0e-5], seed: [1, 2]}   # every combination
      variants: [{training.learning_rate: 5.0e-6, seed: 3}]             # and/or explicit ones
      max_candidates: 16                                                # refused above this

`variants` may also be a mapping, each candidate named by its key (`merged[ties_dpo_heavy]`): the
way to search settings that do not form a grid, such as merge methods with their own parameters.
A variant's values may hold selections (`{best_of: ...}`), like the stage's own.

Where a stage takes a model it may take a selection of a swept stage's candidates, ranked by a
metric of an eval stage that evaluates them: `{best_of: sft, by: eval/heldout/loss, mode: min}`, or
in a list of models (a merge) `{top_k: 3, of: dpo, by: eval/preference/accuracy, mode: max}`. Each
selected place is a `select` step named `<stage>.top<rank>[<by>,<mode>]`; it is resolved once the eval
has run, and what follows it is keyed by the chosen entry alone.
"""
from __future__ import annotations

import copy
import itertools
import re
from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.evaluation.objective import Part
from posttrain.core.strict import StrictModel

DEFAULT_MAX_CANDIDATES = 16


class SweepSpec(StrictModel):
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted key -> values; every combination.")
    variants: list[dict[str, Any]] | dict[str, dict[str, Any] | None] = Field(
        default_factory=list, description="Explicit override mappings; as a mapping, each one named by its key "
                                          "(null drops it, e.g. in a profile).")
    max_candidates: int = Field(DEFAULT_MAX_CANDIDATES, gt=0, description="Refuse a larger expansion.")

    @model_validator(mode="after")
    def _something(self) -> "SweepSpec":
        named = self.variants.values() if isinstance(self.variants, dict) else self.variants
        if not self.grid and not [variant for variant in named if variant is not None]:
            raise ValueError("a sweep needs `grid` and/or `variants`")
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid key {key!r} has no values")
        return self


class ObjectivePart(StrictModel):
    """One metric of a combined dev objective."""

    metric: str = Field(description="<eval stage>/<metric>, e.g. merge_dev/preference/accuracy")
    mode: Literal["min", "max"]
    weight: float = Field(1.0, gt=0, description="Its share of the objective.")

    @model_validator(mode="after")
    def _path(self) -> "ObjectivePart":
        if "/" not in self.metric:
            raise ValueError("`metric` must be <eval stage>/<metric>, e.g. eval/heldout/loss")
        return self


class Selection(StrictModel):
    """`best_of` (one model) or `top_k` of (a list of models): candidates ranked by an eval metric, or
    by a dev objective that combines several (`by:` a list of {metric, mode, weight}; `combine: score`
    or `rank`, see posttrain.evaluation.objective)."""

    best_of: str | None = None
    top_k: int | None = Field(None, gt=0)
    of: str | None = None
    by: str | list[ObjectivePart] = Field(description="<eval stage>/<metric>, e.g. eval/heldout/loss, or a list "
                                                     "of {metric, mode, weight} combined into one objective")
    mode: Literal["min", "max"] | None = Field(None, description="With one metric: which way is better.")
    combine: Literal["score", "rank"] | None = Field(None, description="With several metrics: weighted score "
                                                                       "(default) or weighted mean rank.")

    @model_validator(mode="after")
    def _one_form(self) -> "Selection":
        if (self.best_of is None) == (self.top_k is None):
            raise ValueError("give either `best_of: <stage>` or `top_k: <n>` with `of: <stage>`")
        if self.top_k is not None and not self.of:
            raise ValueError("`top_k` needs `of: <swept stage>`")
        if self.best_of is not None and self.of:
            raise ValueError("`best_of` names the stage itself; leave out `of`")
        if isinstance(self.by, str):
            if "/" not in self.by:
                raise ValueError("`by` must be <eval stage>/<metric>, e.g. eval/heldout/loss")
            if self.mode is None:
                raise ValueError("`mode: min` or `mode: max` says which way `by` is better")
            if self.combine is not None:
                raise ValueError("`combine` joins several metrics: give `by` as a list of {metric, mode, weight}")
        else:
            if not self.by:
                raise ValueError("`by` lists no metric")
            if self.mode is not None:
                raise ValueError("with several metrics each part has its own `mode`; leave out the selection's")
            paths = [part.metric for part in self.by]
            if len(set(paths)) < len(paths):
                raise ValueError("`by` names one metric twice")
        return self

    @property
    def parts(self) -> list[Part]:
        if isinstance(self.by, str):
            stage, _, metric = self.by.partition("/")
            return [Part(stage, metric, self.mode or "min")]
        return [Part(p.metric.partition("/")[0], p.metric.partition("/")[2], p.mode, p.weight) for p in self.by]

    @property
    def how(self) -> str:
        return "metric" if isinstance(self.by, str) else (self.combine or "score")

    @property
    def stage(self) -> str:
        return self.best_of or self.of  # type: ignore[return-value]

    @property
    def count(self) -> int:
        return self.top_k or 1

    def node(self, rank: int) -> str:
        """Name of the step that stands for the candidate in place `rank`: `sft.best`, `dpo.top2`."""
        return f"{self.stage}.best" if self.best_of else f"{self.stage}.top{rank}"


def is_selection(value: Any) -> bool:
    return isinstance(value, dict) and ("best_of" in value or "top_k" in value)


def format_value(value: Any) -> str:
    """A value as it appears in a candidate's label (and so in its ref's file name): floats as Python
    writes them (1e-05), anything but letters, digits and `_.@+-` made `_`."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9_.@+-]", "_", text)


def expand(spec: SweepSpec) -> list[tuple[str, dict[str, Any]]]:
    """(label, {dotted key: value}) for every candidate, grid combinations first, in a stable order.
    A label names each swept key by its last part (the whole key where two last parts clash)."""
    keys = list(spec.grid)
    overrides = [dict(zip(keys, combo)) for combo in itertools.product(*spec.grid.values())] if keys else []
    named = spec.variants if isinstance(spec.variants, dict) else {}
    overrides += [dict(variant) for variant in spec.variants] if isinstance(spec.variants, list) else []
    every_key = list(dict.fromkeys(k for o in overrides for k in o))
    short = {k: k.rsplit(".", 1)[-1] for k in every_key}
    clashing = {s for s in short.values() if list(short.values()).count(s) > 1}
    names = {k: (k if short[k] in clashing else short[k]) for k in every_key}
    labelled = [(",".join(f"{names[k]}={format_value(v)}" for k, v in override.items()), override)
                for override in overrides]
    # A named variant set to null is dropped: how a profile runs fewer of a recipe's candidates.
    return labelled + [(format_value(name), dict(variant)) for name, variant in named.items() if variant is not None]


def apply_override(body: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of a stage body with one dotted key set (missing mappings are made on the way)."""
    out = copy.deepcopy(body)
    node: Any = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value
    return out


def candidate_name(stage: str, label: str) -> str:
    return f"{stage}[{label}]"


def rank_candidates(scores: dict[str, float | None], mode: str) -> list[str]:
    """Candidates best first; ties (and the order of equal scores) keep the sweep's order, so a
    selection never depends on dictionary or file-system order. Candidates without a score go last."""
    order = list(scores)
    scored = [name for name in order if isinstance(scores[name], (int, float))]
    sign = 1.0 if mode == "min" else -1.0
    ranked = sorted(scored, key=lambda name: (sign * float(scores[name]), order.index(name)))
    return ranked + [name for name in order if name not in scored]


# -- wiring into a recipe (used by the loader) ------------------------------------------------------

Report = Any  # the loader's report(loc, message) callback


def sweep_candidates(raw_stages: dict[str, Any], report: Report) -> dict[str, list[tuple[str, str, dict, dict]]]:
    """Swept stage -> [(candidate name, label, overrides, {dotted key: recipe location of its value})]."""
    from pydantic import ValidationError

    found: dict[str, list[tuple[str, str, dict, dict]]] = {}
    for name, body in raw_stages.items():
        if not isinstance(body, dict) or "sweep" not in body:
            continue
        loc = ("stages", name, "sweep")
        try:
            spec = SweepSpec.model_validate(body["sweep"])
        except ValidationError as exc:
            for error in exc.errors():
                report(loc + tuple(error["loc"]), error["msg"].replace("Value error, ", ""))
            continue
        candidates = expand(spec)
        if len(candidates) > spec.max_candidates:
            report(loc, f"expands to {len(candidates)} candidates, more than max_candidates {spec.max_candidates} "
                        "(raise it to run them all)")
            continue
        labels = [label for label, _ in candidates]
        for label in {lab for lab in labels if labels.count(lab) > 1}:
            report(loc, f"two candidates are the same ({label})")
        where = {key: loc + ("grid", key) for key in spec.grid}
        variants = list(spec.variants.items() if isinstance(spec.variants, dict) else enumerate(spec.variants))
        by_label = {format_value(n): n for n, v in spec.variants.items() if v is not None} \
            if isinstance(spec.variants, dict) else {}
        listed = []
        for label, override in candidates:
            if label in by_label:
                places = {key: loc + ("variants", by_label[label], key) for key in override}
            else:
                places = {key: where.get(key) or next(loc + ("variants", i, key) for i, variant in variants
                                                      if key in variant) for key in override}
            listed.append((candidate_name(name, label), label, override, places))
        found[name] = listed
    return found


def rewrite_references(name: str, kind: str, body: dict[str, Any], swept: dict[str, list],
                       selections: dict[str, tuple[Selection, int, tuple]], report: Report) -> dict[str, Any]:
    """The stage body with every selection replaced by the names of its `select` steps (recorded in
    `selections`), and, in an eval's `models`, a swept stage replaced by all its candidates."""
    from pydantic import ValidationError

    def steps(value: Any, loc: tuple, many: bool) -> list[str]:
        try:
            selection = Selection.model_validate(value)
        except ValidationError as exc:
            for error in exc.errors():
                report(loc + tuple(error["loc"]), error["msg"].replace("Value error, ", ""))
            return []
        if selection.stage not in swept:
            report(loc, f"{selection.stage!r} is not a swept stage: only a sweep's candidates are selected")
            return []
        if selection.count > 1 and not many:
            report(loc, "top_k gives several models: use it where a list of models goes (a merge's `models`)")
            return []
        names = []
        for rank in range(1, selection.count + 1):
            node = selection.node(rank)
            if node in selections and selections[node][0] != selection:  # another ranking of the same stage
                node = next(f"{node}.{n}" for n in itertools.count(2) if f"{node}.{n}" not in selections
                            or selections[f"{node}.{n}"][0] == selection)
            selections[node] = (selection, rank, loc)
            names.append(node)
        return names

    out = dict(body)
    for key, value in body.items():
        loc = ("stages", name, key)
        if key == "sweep":
            continue
        if key == "models":
            items = value if isinstance(value, list) else [value]
            models: list[Any] = []
            for i, item in enumerate(items):
                inner = item.get("model") if kind == "merge" and isinstance(item, dict) else None
                if is_selection(item):
                    made = steps(item, loc + ((i,) if isinstance(value, list) else ()), many=True)
                    models += [{"model": n} for n in made] if kind == "merge" else made
                elif is_selection(inner):
                    made = steps(inner, loc + (i, "model"), many=False)
                    models += [{**item, "model": made[0]}] if made else []
                elif kind == "eval" and isinstance(item, str) and item in swept:
                    models += [candidate for candidate, *_ in swept[item]]
                else:
                    models.append(item)
            out[key] = models
        elif is_selection(value):
            made = steps(value, loc, many=False)
            out[key] = made[0] if made else value
    return out


def eval_metrics(body: dict[str, Any]) -> tuple[set[str], list[str]]:
    """(the built-in metrics an eval stage body records, its lm-eval task names)."""
    known: set[str] = set()
    if body.get("perplexity"):
        known |= {"heldout/loss", "heldout/perplexity"} | ({"heldout/kl_to_teacher"} if body.get("kl_to") else set())
    if body.get("preference"):
        known |= {"preference/accuracy", "preference/margin"}
    if body.get("exact_match"):
        known.add("generation/exact_match")
    tasks = body.get("tasks") if isinstance(body.get("tasks"), list) else []
    return known, [str(t) for t in tasks]


def select_configs(selections: dict[str, tuple[Selection, int, tuple]], raw_stages: dict[str, Any],
                   swept: dict[str, list], report: Report) -> dict[str, dict[str, Any]]:
    """`select` step name -> its config, after checking that each eval it reads exists, evaluates the
    swept stage's candidates and records the metric."""
    configs = {}
    for node, (selection, rank, loc) in selections.items():
        good = True
        for i, part in enumerate(selection.parts):
            where = loc + (("by",) if isinstance(selection.by, str) else ("by", i, "metric"))
            body = raw_stages.get(part.eval)
            if not isinstance(body, dict) or body.get("kind") != "eval":
                report(where, f"{part.eval!r} is not an eval stage of this recipe")
                good = False
                continue
            models = body.get("models") if isinstance(body.get("models"), list) else []
            if selection.stage not in models:
                report(where, f"eval stage {part.eval!r} does not evaluate {selection.stage!r} (add it to its models)")
                good = False
                continue
            known, tasks = eval_metrics(body)
            if part.metric not in known and not any(part.metric.startswith(task + "/") for task in tasks):
                measured = ", ".join(sorted(known) + [f"{t}/..." for t in tasks]) or "nothing"
                report(where, f"eval stage {part.eval!r} does not measure {part.metric!r} (it measures: {measured})")
                good = False
        candidates = [candidate for candidate, *_ in swept[selection.stage]]
        if rank > len(candidates):
            report(loc, f"top_k {selection.count} is more than the {len(candidates)} candidates of {selection.stage!r}")
            continue
        if good:
            configs[node] = {"kind": "select", "of": selection.stage, "candidates": candidates,
                             "parts": [{"eval": p.eval, "metric": p.metric, "mode": p.mode, "weight": p.weight}
                                       for p in selection.parts],
                             "combine": selection.how, "rank": rank}
    return configs
