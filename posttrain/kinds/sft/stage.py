"""`kind: sft`: supervised fine-tuning on trl's SFTTrainer, full or LoRA, loss on assistant tokens.

With LoRA the entry is the merged full model (adapter kept in `adapter/`), so the next stage takes it
like any other checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from posttrain.data.sources import DataConfig, config_problems, local_data_files
from posttrain.training.speed import AttentionChoice
from posttrain.kinds.base import (ChatTraining, Stage, StageConfig, StageContext, TrainsWeights,
                                   check_training_keys)

class SFTStageConfig(StageConfig, ChatTraining, TrainsWeights, AttentionChoice):
    kind: Literal["sft"] = "sft"
    model: str = Field("base", description="Stage or model to fine-tune.")
    data: DataConfig
    assistant_only_loss: bool = Field(True, description="Loss on assistant tokens only (chat data).")
    packing: bool = False
    padding_free: bool = False


class SFTStage(Stage):
    kind = "sft"
    version = "1"
    Config = SFTStageConfig
    produces = "model"

    def inputs(self, config: SFTStageConfig) -> dict[str, str]:
        return {"model": config.model}

    def prepared_data(self, config: SFTStageConfig) -> dict[str, dict[str, Any]]:
        return {"data": {"model": config.model, "format": "chat", "data": config.data,
                         "assistant_only": config.assistant_only_loss, "chat_template": config.chat_template}}

    def keeps_tokenizer(self, config: SFTStageConfig) -> str | None:
        return None if config.chat_template else "model"

    def local_files(self, config: SFTStageConfig) -> dict[str, str]:
        return local_data_files(config.data)

    def validate(self, config: SFTStageConfig, recipe_dir: Path) -> list[tuple[str, str]]:
        from posttrain.hf.chat_templates import template_problems

        from posttrain.training.speed import speed_problems

        return (check_training_keys(config.training) + speed_problems(config.training)
                + template_problems(config.chat_template, recipe_dir)
                + config_problems(config.data, recipe_dir))

    def run(self, config: SFTStageConfig, ctx: StageContext) -> dict[str, Any]:
        from posttrain.kinds.sft.run import run_sft

        return run_sft(config, ctx)
