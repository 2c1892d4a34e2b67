"""The recipe's top-level shape. Stage bodies are validated separately, by their kind's own config model."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

# Re-exported: the shared config types live on the ground floor (posttrain.core.strict).
from posttrain.core.strict import NAME_PATTERN, RESERVED_NAMES, ModelSpec, StrictModel, check_name  # noqa: F401 - re-exported

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


class SlurmSettings(StrictModel):
    """The resources of one Slurm job (one stage): what `sbatch` is asked for, through submitit."""

    partition: str | None = Field(None, description="Slurm partition.")
    account: str | None = Field(None, description="Slurm account to charge.")
    qos: str | None = Field(None, description="Slurm quality of service.")
    nodes: int = Field(1, gt=0, description="Nodes per job; the stage's launch spans them (one launcher per node).")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (0: a CPU job, e.g. a merge).")
    cpus_per_task: int | None = Field(None, gt=0, description="CPU cores per node (one task per node).")
    mem_gb: int | None = Field(None, gt=0, description="Memory per node in GB.")
    time: str = Field("24:00:00", description="Time limit: [D-]HH:MM:SS or minutes. A job stopped by it is "
                                              "resubmitted and resumes from its in-stage checkpoint.")
    sbatch: dict[str, Any] = Field(default_factory=dict, description="Further sbatch options, e.g. "
                                   "{constraint: h100, exclusive: true, reservation: r1}.")
    setup: list[str] = Field(default_factory=list, description="Shell lines run before the stage in the job "
                             "script, e.g. module loads or activating the environment.")
    folder: str | None = Field(None, description="Where job scripts and Slurm logs go (default: jobs/ in the "
                                                 "registry, which every node must see anyway).")
    cluster: Literal["slurm", "local", "debug"] = Field(
        "slurm", description="submitit's backend: slurm (sbatch), or local (jobs as local subprocesses through "
                             "submitit, to try a recipe's Slurm path on one machine).")

    @field_validator("time")
    @classmethod
    def _time(cls, value: str) -> str:
        slurm_minutes(value)
        return value


def slurm_minutes(value: str) -> int:
    """Minutes of a Slurm time limit written as MM, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    text = str(value).strip()
    days, _, clock = text.rpartition("-") if "-" in text else ("0", "", text)
    try:
        parts = [int(p) for p in clock.split(":")]
        day_count = int(days)
    except ValueError:
        raise ValueError(f"{value!r} is not a time limit: use [D-]HH:MM:SS or minutes") from None
    if "-" in text:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:  # MM:SS, as Slurm reads it
        hours, minutes, seconds = 0, parts[0], parts[1]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:
        raise ValueError(f"{value!r} is not a time limit: use [D-]HH:MM:SS or minutes")
    if min(day_count, hours, minutes, seconds) < 0:
        raise ValueError(f"{value!r} is not a time limit")
    total = day_count * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    if total <= 0:
        raise ValueError(f"{value!r} is not a time limit: it must be at least a minute")
    return total


class KindLaunch(StrictModel):
    """How stages of one kind run, where that differs from the recipe's `launch:` (merges and evals
    need no 8-GPU node). Only the settings written here change."""

    num_processes: int | None = Field(None, gt=0, description="Processes of the stage's own launch.")
    accelerate_config: str | None = Field(None, description="accelerate config for this kind.")
    slurm: dict[str, Any] | None = Field(None, description="Slurm settings for this kind (any `launch.slurm` key).")

    @field_validator("slurm")
    @classmethod
    def _slurm_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            SlurmSettings.model_validate(value)  # every key must be a Slurm setting, with a valid value
        return value


class Launch(StrictModel):
    """How the recipe is meant to run on its cluster: each stage's own launch (processes, accelerate
    config), and the executor that runs stages as jobs (used by `plan` and `run`)."""

    num_processes: int = Field(1, gt=0, description="Processes (GPUs) per run; memory estimates divide by it.")
    accelerate_config: str | None = Field(None, description="accelerate config (relative to the recipe).")
    executor: Literal["local", "slurm"] = Field(
        "local", description="local: on this machine, one stage at a time in this process (or one launch), or "
                             "`slots` stages at once, each a job of its own; slurm: each stage a Slurm job "
                             "(through submitit), as many at once as the graph allows.")
    slots: int = Field(1, gt=0, description="local executor: how many stages run at once (1: in this process, "
                                            "as always; more: each stage a job of its own).")
    gpus_per_slot: int = Field(0, ge=0, description="local executor: GPUs each slot sees (CUDA_VISIBLE_DEVICES); "
                                                    "0 leaves the variable alone.")
    max_retries: int = Field(2, ge=0, description="Resubmissions of a job that was killed (preemption, time "
                                                  "limit, lost node); each resumes from its in-stage checkpoint.")
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    kinds: dict[str, KindLaunch] = Field(default_factory=dict, description="Per stage kind: what differs from the "
                                         "settings above, e.g. {merge: {num_processes: 1, slurm: {gpus_per_node: 0}}}.")

    def for_kind(self, kind: str) -> "Launch":
        """These settings with the kind's own (`kinds.<kind>`) written over them."""
        own = self.kinds.get(kind)
        if own is None:
            return self
        update = {name: getattr(own, name) for name in own.model_fields_set if name != "slurm"}
        if own.slurm:
            update["slurm"] = self.slurm.model_copy(update=SlurmSettings.model_validate(own.slurm).model_dump(
                include=set(own.slurm)))
        return self.model_copy(update=update)


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
