"""Quality gates: after a run, named checks on stage metrics; a failing gate fails the run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from posttrain.errors import UserError


@dataclass
class GateResult:
    name: str
    passed: bool
    detail: str


AGGREGATES = {"mean": lambda values: sum(values) / len(values), "min": min, "max": max}


def _aggregate(path: str) -> tuple[str | None, str]:
    """`mean(eval/sft/heldout/loss)` -> ("mean", "eval/sft/heldout/loss"); a plain path -> (None, path)."""
    for name in AGGREGATES:
        if path.startswith(name + "(") and path.endswith(")"):
            return name, path[len(name) + 1:-1]
    return None, path


def metric_value(path: str, entries: dict[str, Any]) -> float:
    """`<stage>/<metric>` or `<eval stage>/<model>/<metric...>` -> a number; `mean(...)`, `min(...)` or
    `max(...)` of an eval metric over a swept stage's candidates (`mean(eval/sft/heldout/loss)`)."""
    aggregate, path = _aggregate(path)
    if aggregate:
        stage, _, rest = path.partition("/")
        swept, _, name = rest.partition("/")
        results = entries[stage].manifest.get("metrics", {}).get("results", {}) if stage in entries else {}
        candidates = [model for model in results if model.startswith(swept + "[")]
        if not candidates:
            raise UserError(f"gate metric {aggregate}({path}): {stage!r} evaluated no candidates of {swept!r}")
        return AGGREGATES[aggregate]([metric_value(f"{stage}/{model}/{name}", entries) for model in candidates])
    stage, _, rest = path.partition("/")
    if stage not in entries:
        raise UserError(f"gate metric {path!r}: no stage {stage!r} in this run")
    metrics = entries[stage].manifest.get("metrics", {})
    if entries[stage].kind == "eval":
        model, _, name = rest.partition("/")
        value = metrics.get("results", {}).get(model, {}).get(name)
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


def check_gates(gates, entries: dict[str, Any]) -> list[GateResult]:
    results = []
    for gate in gates:
        value = metric_value(gate.metric, entries)
        bound = gate.below if gate.below is not None else gate.above
        limit = float(bound) if isinstance(bound, (int, float)) else metric_value(str(bound), entries)
        if gate.below is not None:
            passed, relation, target = value < limit - gate.margin, "<", limit - gate.margin
        else:
            passed, relation, target = value > limit + gate.margin, ">", limit + gate.margin
        results.append(GateResult(gate.name, passed, f"{gate.metric} = {value:.4g} {relation} {target:.4g}"))
    return results


def gate_stages(gate) -> list[str]:
    """Stage names a gate reads, for validation."""
    names = [_aggregate(gate.metric)[1].split("/", 1)[0]]
    for bound in (gate.below, gate.above):
        if isinstance(bound, str):
            names.append(_aggregate(bound)[1].split("/", 1)[0])
    return names
