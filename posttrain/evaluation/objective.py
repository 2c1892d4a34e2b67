"""A dev objective: one number per model from several eval metrics, so a selection (or a gate) can rank
models on more than one skill at once.

Two ways to combine the parts, each part being `<eval stage>/<metric>` with a mode and a weight:

- `score` (absolute, comparable across runs and against models outside the candidates):
  sum of weight x value, a `min` metric counted negative. Higher is better. The weights carry the
  scales: a loss of ~1.5 and an accuracy in [0, 1] want e.g. weights 1 and 2.
- `rank` (scale-free, only among the models ranked together): the weighted mean of each model's place
  per metric (1 = best, ties share their mean place). Lower is better.

A single metric (`by: eval/heldout/loss`) is combined as `metric`: the value itself, in its own mode, so
a one-metric selection records the metric as it always did.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

Combine = Literal["metric", "score", "rank"]


@dataclass(frozen=True)
class Part:
    eval: str
    metric: str
    mode: Literal["min", "max"]
    weight: float = 1.0

    @property
    def path(self) -> str:
        return f"{self.eval}/{self.metric}"


def objective_mode(parts: list[Part], combine: Combine) -> Literal["min", "max"]:
    """Which way the combined number is better."""
    if combine == "metric":
        return parts[0].mode
    return "max" if combine == "score" else "min"


def describe(parts: list[Part], combine: Combine) -> str:
    """`sft_dev/heldout/loss`, or `score(dev/heldout/loss min x1, dev/preference/accuracy max x2)`."""
    if combine == "metric":
        return parts[0].path
    return f"{combine}(" + ", ".join(f"{p.path} {p.mode} x{p.weight:g}" for p in parts) + ")"


def metric_of(results: Mapping[str, Any], model: str, metric: str) -> float | None:
    """A model's value of a metric in an eval stage's `results` (None where it has none)."""
    value = results.get(model, {}).get(metric)
    value = value.get("value") if isinstance(value, dict) else value
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def part_values(parts: list[Part], results_by_eval: Mapping[str, Mapping[str, Any]],
                models: list[str]) -> dict[str, dict[str, float | None]]:
    """model -> {part path: value} from each part's eval results."""
    return {model: {p.path: metric_of(results_by_eval.get(p.eval, {}), model, p.metric) for p in parts}
            for model in models}


def combine(parts: list[Part], how: Combine, values: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """model -> its objective (None where a part is missing). `values` as `part_values` gives them; for
    `rank` the places are taken among exactly these models."""
    complete = [m for m, got in values.items() if all(got.get(p.path) is not None for p in parts)]
    out: dict[str, float | None] = {m: None for m in values}
    if how == "metric":
        for m in complete:
            out[m] = values[m][parts[0].path]
        return out
    if how == "score":
        for m in complete:
            out[m] = sum(p.weight * (1.0 if p.mode == "max" else -1.0) * float(values[m][p.path])  # type: ignore[arg-type]
                         for p in parts)
        return out
    total = sum(p.weight for p in parts)
    for m in complete:
        out[m] = 0.0
    for p in parts:
        places = _places({m: float(values[m][p.path]) for m in complete}, p.mode)  # type: ignore[arg-type]
        for m in complete:
            out[m] += p.weight * places[m] / total  # type: ignore[operator]
    return out


def _places(scores: dict[str, float], mode: str) -> dict[str, float]:
    """1 = best; models with equal values share the mean of the places they span."""
    sign = 1.0 if mode == "min" else -1.0
    ordered = sorted(scores, key=lambda m: sign * scores[m])
    places: dict[str, float] = {}
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and scores[ordered[j + 1]] == scores[ordered[i]]:
            j += 1
        for m in ordered[i:j + 1]:
            places[m] = (i + j) / 2 + 1
        i = j + 1
    return places
