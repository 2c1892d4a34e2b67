"""Quality gates: after a run, named checks on stage metrics; a failing gate fails the run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from posttrain.core.errors import UserError
from posttrain.evaluation.objective import Part, combine, metric_of, part_values


@dataclass
class GateResult:
    name: str
    passed: bool
    detail: str


AGGREGATES = {"mean": lambda values: sum(values) / len(values), "min": min, "max": max}
OBJECTIVE = "objective"


@dataclass(frozen=True)
class Objective:
    """What a gate needs of a selection to read its dev objective: the parts, how they combine, and
    the candidate it chose (None before it has)."""

    parts: list[Part]
    combine: str
    chosen: str | None


def _aggregate(path: str) -> tuple[str | None, str]:
    """`mean(eval/sft/heldout/loss)` -> ("mean", "eval/sft/heldout/loss"); a plain path -> (None, path)."""
    for name in AGGREGATES:
        if path.startswith(name + "(") and path.endswith(")"):
            return name, path[len(name) + 1:-1]
    return None, path


def _listed(path: str) -> tuple[str, list[str], str] | None:
    """`eval/{a,b}/heldout/loss` -> ("eval/", ["a", "b"], "/heldout/loss"); None without braces."""
    start, end = path.find("{"), path.find("}")
    if start < 0 or end < start:
        return None
    return path[:start], [m.strip() for m in path[start + 1:end].split(",") if m.strip()], path[end + 1:]


def metric_value(path: str, entries: dict[str, Any], objectives: dict[str, Objective] | None = None) -> float:
    """A gate's number:
    - `<stage>/<metric>`, or `<eval stage>/<model>/<metric...>`;
    - `<select step>/objective`: the dev objective of the candidate it chose, and
      `<select step>/objective/<model>`: the same objective for any model its evals evaluated;
    - `mean(...)`, `min(...)` or `max(...)` over a swept stage's candidates (`mean(eval/sft/heldout/loss)`)
      or over models listed in braces (`max(eval/{sft.best,dpo.best}/preference/accuracy)`)."""
    aggregate, path = _aggregate(path)
    listed = _listed(path)
    if aggregate and listed:
        head, models, tail = listed
        return AGGREGATES[aggregate]([metric_value(f"{head}{model}{tail}", entries, objectives) for model in models])
    if listed:
        raise UserError(f"gate metric {path!r}: a list of models needs mean(...), min(...) or max(...) around it")
    stage, _, rest = path.partition("/")
    if aggregate:
        swept, _, name = rest.partition("/")
        results = entries[stage].manifest.get("metrics", {}).get("results", {}) if stage in entries else {}
        candidates = [model for model in results if model.startswith(swept + "[")]
        if not candidates:
            raise UserError(f"gate metric {aggregate}({path}): {stage!r} evaluated no candidates of {swept!r}")
        return AGGREGATES[aggregate]([metric_value(f"{stage}/{model}/{name}", entries, objectives)
                                      for model in candidates])
    if objectives and stage in objectives and rest.split("/", 1)[0] == OBJECTIVE:
        return _objective_value(path, objectives[stage], rest.partition("/")[2], entries)
    if stage not in entries:
        raise UserError(f"gate metric {path!r}: no stage {stage!r} in this run")
    metrics = entries[stage].manifest.get("metrics", {})
    if entries[stage].kind == "eval":
        model, _, name = rest.partition("/")
        results = metrics.get("results", {})
        if model not in results and objectives and objectives.get(model) and objectives[model].chosen:
            model = objectives[model].chosen  # a selection, in an eval that evaluated its candidates
        value = results.get(model, {}).get(name)
        value = value.get("value") if isinstance(value, dict) else None
    else:
        value = metrics.get(rest)
        if isinstance(value, list) and value:  # a series: its last point
            last = value[-1]
            value = next((last[k] for k in ("value", "loss", "eval_loss") if k in last), None) \
                if isinstance(last, dict) else last
    if not isinstance(value, (int, float)):
        raise UserError(f"gate metric {path!r} has no numeric value (stage {stage!r} recorded: "
                        f"{', '.join(sorted(metrics)) or 'nothing'})")
    return float(value)


def _objective_value(path: str, objective: Objective, model: str, entries: dict[str, Any]) -> float:
    model = model or objective.chosen or ""
    if not model:
        raise UserError(f"gate metric {path!r}: the selection has chosen nothing yet")
    if objective.combine == "rank":
        raise UserError(f"gate metric {path!r}: a rank objective has no value outside its ranking; "
                        "use `combine: score` to compare it with other models")
    results = {p.eval: entries[p.eval].manifest.get("metrics", {}).get("results", {})
               for p in objective.parts if p.eval in entries}
    value = combine(objective.parts, objective.combine, part_values(objective.parts, results, [model]))[model]  # type: ignore[arg-type]
    if value is None:
        missing = [p.path for p in objective.parts if metric_of(results.get(p.eval, {}), model, p.metric) is None]
        raise UserError(f"gate metric {path!r}: no {', '.join(missing)} for {model!r} "
                        f"(add {model!r} to the models of {', '.join(sorted({m.split('/')[0] for m in missing}))})")
    return value


def check_gates(gates, entries: dict[str, Any], objectives: dict[str, Objective] | None = None) -> list[GateResult]:
    results = []
    for gate in gates:
        value = metric_value(gate.metric, entries, objectives)
        bound = gate.below if gate.below is not None else gate.above
        limit = float(bound) if isinstance(bound, (int, float)) else metric_value(str(bound), entries, objectives)
        if gate.below is not None:
            passed, relation, target = value < limit - gate.margin, "<", limit - gate.margin
        else:
            passed, relation, target = value > limit + gate.margin, ">", limit + gate.margin
        results.append(GateResult(gate.name, passed, f"{gate.metric} = {value:.4g} {relation} {target:.4g}"))
    return results


def gate_stages(gate) -> list[str]:
    """Stage names a gate reads, for validation."""
    names = []
    for path in (gate.metric, gate.below, gate.above):
        if not isinstance(path, str):
            continue
        path = _aggregate(path)[1]
        listed = _listed(path)
        names.append((listed[0] if listed else path).split("/", 1)[0])
    return names
