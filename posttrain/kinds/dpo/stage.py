"""`kind: dpo`: preference optimisation on trl's DPOTrainer.

The policy is the input stage's checkpoint; the reference is the same checkpoint unless `ref_model`
names another. With `precompute_ref_log_probs` (default) the reference's log-probs are computed once
before training, so no reference copy sits in memory while training; with LoRA the reference is the
adapter-disabled model. The entry is always a full model (LoRA merged, adapter kept in `adapter/`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from posttrain.data.sources import DataConfig, config_problems, local_data_files
from posttrain.training.speed import AttentionChoice
from posttrain.kinds.base import (ChatTraining, Stage, StageConfig, StageContext, TrainsWeights,
                                   check_training_keys)

# trl 1.16's DPO loss types.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
DPO_FIELDS = ("trainer/dpo_config.py", "DPOConfig")
DPO_OWN_KEYS = {"beta", "loss_type", "loss_weights", "label_smoothing", "precompute_ref_log_probs"}


class DPOStageConfig(StageConfig, ChatTraining, TrainsWeights, AttentionChoice):
    kind: Literal["dpo"] = "dpo"
    model: str = Field("base", description="Stage or model to optimise (the policy).")
    ref_model: str | None = Field(None, description="Reference stage or model; default: the policy's input.")
    data: DataConfig
    beta: float = Field(0.1, gt=0)
    loss_type: list[str] = Field(default_factory=lambda: ["sigmoid"], min_length=1)
    loss_weights: list[float] | None = None
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    precompute_ref_log_probs: bool = Field(True, description="Reference log-probs computed once, before training.")
    padding_free: bool = Field(False, description="Run the decoder over the real tokens of a batch only, its "
                                                  "sequences packed into one row (flash-attention varlen on a GPU).")

    @field_validator("loss_type", mode="before")
    @classmethod
    def _listify(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("loss_type")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        for loss in value:
            if loss not in LOSS_TYPES:
                raise ValueError(f"unknown DPO loss type {loss!r}; one of: {', '.join(LOSS_TYPES)}")
        return value


class DPOStage(Stage):
    kind = "dpo"
    version = "1"
    Config = DPOStageConfig
    produces = "model"

    def inputs(self, config: DPOStageConfig) -> dict[str, str]:
        refs = {"model": config.model}
        if config.ref_model:
            refs["ref_model"] = config.ref_model
        return refs

    def prepared_data(self, config: DPOStageConfig) -> dict[str, dict[str, Any]]:
        return {"data": {"model": config.model, "format": "preference", "data": config.data,
                         "chat_template": config.chat_template}}

    def keeps_tokenizer(self, config: DPOStageConfig) -> str | None:
        return None if config.chat_template else "model"

    def local_files(self, config: DPOStageConfig) -> dict[str, str]:
        return local_data_files(config.data)

    def validate(self, config: DPOStageConfig, recipe_dir: Path) -> list[tuple[str, str]]:
        from posttrain.training.speed import speed_problems

        problems = check_training_keys(config.training, DPO_FIELDS) + speed_problems(config.training)
        for key in DPO_OWN_KEYS & set(config.training):
            problems.append((f"training.{key}", f"set it as the stage's own `{key}:`"))
        if config.loss_weights is not None and len(config.loss_weights) != len(config.loss_type):
            problems.append(("loss_weights", f"needs one weight per loss type ({len(config.loss_type)})"))
        return problems + config_problems(config.data, recipe_dir)

    def run(self, config: DPOStageConfig, ctx: StageContext) -> dict[str, Any]:
        from posttrain.kinds.dpo.run import run_dpo

        return run_dpo(config, ctx)
