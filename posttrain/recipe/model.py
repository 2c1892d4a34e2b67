"""The recipe's top-level shape. Stage bodies are validated separately, by their kind's own config model."""
from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

# Re-exported: the shared config types live on the ground floor (posttrain.strict).
from posttrain.strict import NAME_PATTERN, RESERVED_NAMES, ModelSpec, StrictModel, check_name  # noqa: F401 - re-exported

class Gate(StrictModel):
    """A quality gate checked after a run: `metric` must be below/above a number or another metric.

    Metric paths: `<stage>/<metric>` for a stage's metrics (the last value of a series), and
    `<eval stage>/<model>/<metric>` for eval results, e.g. `eval/sft/heldout/loss`.
    """

    name: str
    metric: str
    below: float | str | None = None
    above: float | str | None = None
    margin: float = Field(0.0, description="Required distance beyond the bound.")

    @field_validator("above")
    @classmethod
    def _one_bound(cls, value, info):
        if (value is None) == (info.data.get("below") is None):
            raise ValueError("give exactly one of `below` or `above`")
        return value


class Launch(StrictModel):
    """How the recipe is meant to run on its cluster (used by `plan` and `run --launcher`)."""

    num_processes: int = Field(1, gt=0, description="Processes (GPUs) per run; memory estimates divide by it.")
    accelerate_config: str | None = Field(None, description="accelerate config (relative to the recipe).")


class Recipe(StrictModel):
    """A whole recipe after profiles and overrides are applied."""

    name: str = Field(description="Recipe name; refs are stored as <name>/<stage>.")
    description: str | None = None
    base: ModelSpec
    models: dict[str, ModelSpec] = Field(
        default_factory=dict, description="Further named models (teachers, references) stages may refer to."
    )
    registry: str | None = Field(None, description="Registry folder (relative to the recipe file).")
    seed: int = 42
    defaults: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Settings applied to every stage of a kind: defaults.<kind>.<key>."
    )
    stages: dict[str, dict[str, Any]] = Field(description="Named stages; each has a `kind`.")
    profiles: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Named partial recipes deep-merged over this one (--profile NAME)."
    )
    gates: list[Gate] = Field(default_factory=list, description="Quality gates checked after `run`.")
    launch: Launch = Field(default_factory=Launch)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "recipe name")

    @field_validator("models", "stages", "profiles")
    @classmethod
    def _names(cls, v: dict) -> dict:
        for key in v:
            check_name(str(key), "name")
        return v

    @field_validator("stages")
    @classmethod
    def _not_empty(cls, v: dict) -> dict:
        if not v:
            raise ValueError("a recipe needs at least one stage")
        return v
