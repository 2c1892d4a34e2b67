"""A selection: a node of the recipe's graph that picks the candidate of a swept stage in one place of a
ranking by an eval metric, or by a dev objective that combines several (`posttrain.evaluation.objective`).

It is not a stage kind: it builds nothing and has no `run`. Recipes do not write it; the loader adds
one for every `{best_of: ...}` / `{top_k: ...}` a stage takes as a model. Once the evals it reads have
run, the runner (or the job driver) hands the chosen candidate's entry on, and the stages that take it
are keyed by that entry alone (so a new candidate that does not win changes nothing downstream). The
choice, with every candidate's score, is recorded in the manifest of each stage that takes it.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from posttrain.evaluation.objective import Part, combine, describe, objective_mode, part_values
from posttrain.kinds.base import StageConfig
from posttrain.core.strict import StrictModel


class SelectPart(StrictModel):
    eval: str = Field(description="The eval stage whose results give this part.")
    metric: str = Field(description="The metric, as the eval stage records it (e.g. heldout/loss).")
    mode: Literal["min", "max"]
    weight: float = Field(1.0, gt=0)


class SelectConfig(StageConfig):
    kind: Literal["select"] = "select"
    of: str = Field(description="The swept stage.")
    candidates: list[str] = Field(description="Its candidates, in the sweep's order (ties keep this order).")
    parts: list[SelectPart] = Field(min_length=1, description="The metrics that rank them.")
    combine: Literal["metric", "score", "rank"] = Field("metric", description="How the parts make one objective "
                                                                              "(posttrain.evaluation.objective).")
    rank: int = Field(1, gt=0, description="1 = the best.")

    @property
    def objective_parts(self) -> list[Part]:
        return [Part(p.eval, p.metric, p.mode, p.weight) for p in self.parts]

    @property
    def evals(self) -> list[str]:
        return list(dict.fromkeys(p.eval for p in self.parts))

    @property
    def mode(self) -> str:
        return objective_mode(self.objective_parts, self.combine)

    @property
    def by(self) -> str:
        return describe(self.objective_parts, self.combine)


class Selection:
    """The selection node's behaviour in the graph: what it reads, and how it scores the candidates."""

    kind = "select"  # its label in plans, progress lines and manifests; no registered stage kind
    Config = SelectConfig

    def inputs(self, config: SelectConfig) -> dict[str, str]:
        refs = {f"candidates.{i}": name for i, name in enumerate(config.candidates)}
        refs.update({f"evals.{i}": name for i, name in enumerate(config.evals)})
        return refs

    def keeps_tokenizer(self, config: SelectConfig) -> str | None:
        return "candidates.0"  # every candidate of a sweep carries the same tokenizer

    def prepared_data(self, config: SelectConfig) -> dict[str, dict[str, Any]]:
        return {}  # it reads no data

    def part_values(self, config: SelectConfig, results_by_eval: dict[str, dict[str, Any]],
                    models: list[str] | None = None) -> dict[str, dict[str, float | None]]:
        """model (the candidates by default) -> {part: value} from each eval's `results`."""
        return part_values(config.objective_parts, results_by_eval, models or config.candidates)

    def scores(self, config: SelectConfig, results_by_eval: dict[str, dict[str, Any]]) -> dict[str, float | None]:
        """Each candidate's objective (None where a part is missing)."""
        return combine(config.objective_parts, config.combine, self.part_values(config, results_by_eval))
