"""`kind: select`: the candidate of a swept stage in one place of a ranking by an eval metric.

Recipes do not write this kind: the loader adds one for every `{best_of: ...}` / `{top_k: ...}` a
stage takes as a model. It builds no entry: once the eval it reads has run, the runner hands the
chosen candidate's entry on, and the stages that take it are keyed by that entry alone (so a new
candidate that does not win changes nothing downstream). The choice, with every candidate's score,
is recorded in the manifest of each stage that takes it.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from posttrain.stages.base import Stage, StageConfig, StageContext


class SelectConfig(StageConfig):
    kind: Literal["select"] = "select"
    of: str = Field(description="The swept stage.")
    candidates: list[str] = Field(description="Its candidates, in the sweep's order (ties keep this order).")
    eval: str = Field(description="The eval stage whose results rank them.")
    metric: str = Field(description="The metric, as the eval stage records it (e.g. heldout/loss).")
    mode: Literal["min", "max"]
    rank: int = Field(1, gt=0, description="1 = the best.")


class SelectStage(Stage):
    kind = "select"
    version = "1"
    Config = SelectConfig
    produces = "model"

    def inputs(self, config: SelectConfig) -> dict[str, str]:
        refs = {f"candidates.{i}": name for i, name in enumerate(config.candidates)}
        refs["eval"] = config.eval
        return refs

    def keeps_tokenizer(self, config: SelectConfig) -> str | None:
        return "candidates.0"  # every candidate of a sweep carries the same tokenizer

    def scores(self, config: SelectConfig, eval_metrics: dict[str, Any]) -> dict[str, float | None]:
        """Each candidate's value of the metric in the eval's results (None where it has none)."""
        results = eval_metrics.get("results", {})
        found = {}
        for name in config.candidates:
            value = results.get(name, {}).get(config.metric)
            value = value.get("value") if isinstance(value, dict) else value
            found[name] = float(value) if isinstance(value, (int, float)) else None
        return found

    def run(self, config: SelectConfig, ctx: StageContext) -> dict[str, Any]:
        raise RuntimeError("select steps are resolved by the runner, never run")
