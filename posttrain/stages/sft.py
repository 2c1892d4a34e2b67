"""`kind: sft`: supervised fine-tuning on trl's SFTTrainer, full or LoRA, loss on assistant tokens.

With LoRA the entry is the merged full model (adapter kept in `adapter/`), so the next stage takes it
like any other checkpoint.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from posttrain.data.sources import DataConfig, config_problems, local_data_files
from posttrain.strict import StrictModel
from posttrain.stages.base import Stage, StageConfig, StageContext, TrainsWeights

# Set by posttrain itself: a recipe must not override these through `training:`.
RESERVED_TRAINING_KEYS = {"output_dir", "max_length", "assistant_only_loss", "packing", "padding_free",
                          "gradient_checkpointing", "activation_checkpointing", "seed", "dataset_text_field", "resume_from_checkpoint"}


class LoraSettings(StrictModel):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class SFTStageConfig(StageConfig, TrainsWeights):
    kind: Literal["sft"] = "sft"
    model: str = Field("base", description="Stage or model to fine-tune.")
    data: DataConfig
    lora: LoraSettings | None = Field(None, description="Train a LoRA adapter (merged into the output).")
    chat_template: str | None = Field(
        None, description="Replace the input's chat template (a known name, .jinja file or text); saved in the output.")
    assistant_only_loss: bool = Field(True, description="Loss on assistant tokens only (chat data).")
    packing: bool = False
    padding_free: bool = False
    gradient_checkpointing: bool = False
    save_steps: int = Field(50, gt=0, description="In-stage checkpoint interval (for resume).")
    training: dict[str, Any] = Field(default_factory=dict, description="Any trl SFTConfig / TrainingArguments field.")


class SFTStage(Stage):
    kind = "sft"
    version = "1"
    Config = SFTStageConfig
    produces = "model"

    def inputs(self, config: SFTStageConfig) -> dict[str, str]:
        return {"model": config.model}

    def local_files(self, config: SFTStageConfig) -> dict[str, str]:
        return local_data_files(config.data)

    def validate(self, config: SFTStageConfig, recipe_dir: Path) -> list[tuple[str, str]]:
        from posttrain.chat_templates import template_problems

        return (check_training_keys(config.training) + template_problems(config.chat_template, recipe_dir)
                + config_problems(config.data, recipe_dir))

    def run(self, config: SFTStageConfig, ctx: StageContext) -> dict[str, Any]:
        from posttrain.training.sft_run import run_sft

        return run_sft(config, ctx)


def check_training_keys(training: dict[str, Any], trl_config: tuple[str, str] | None = ("trainer/sft_config.py", "SFTConfig")
                        ) -> list[tuple[str, str]]:
    """`training:` keys must be fields of TrainingArguments (and of the trl config, if the stage uses one)."""
    from posttrain.training_fields import trainer_fields

    known = trainer_fields(trl_config)
    problems = []
    for key in training:
        if key in RESERVED_TRAINING_KEYS:
            problems.append((f"training.{key}", "set by posttrain; use the stage's own setting instead"))
        elif known and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            owner = f"TrainingArguments/{trl_config[1]}" if trl_config else "TrainingArguments"
            problems.append((f"training.{key}", f"not a {owner} field{hint}"))
    return problems


