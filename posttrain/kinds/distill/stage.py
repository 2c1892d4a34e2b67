"""`kind: distill`: train a student on stored teacher targets (ours, or the arcee-ai layout).

Tokenizer compatibility is checked before training; the loss is computed in chunks from hidden states
so the [tokens, vocab] student log-softmax never materialises for the whole batch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.core.strict import StrictModel
from posttrain.training.speed import AttentionChoice
from posttrain.kinds.base import Stage, StageConfig, StageContext, TrainsWeights, check_training_keys


class LogitsDataset(StrictModel):
    """Stored teacher logits in the released arcee-ai/LLama-405B-Logits layout (or any alike)."""

    hub: str | None = None
    path: str | None = None
    split: str = "train"
    revision: str | None = None
    input_ids: str = "input_ids"
    token_ids: str = Field("token_ids", description="Column of top-k ids per position.")
    values: str = Field("top_values", description="Column of top-k values per position.")
    value_kind: Literal["raw_logits", "logprobs"] = Field(
        "raw_logits", description="arcee-ai/LLama-405B-Logits `top_values` are raw logits.")
    vocab_size: int = Field(128256, gt=0, description="Teacher vocabulary size (checked against the student).")
    max_samples: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_origin(self) -> "LogitsDataset":
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of `path` or `hub`")
        return self


class DistillConfig(StageConfig, TrainsWeights, AttentionChoice):
    kind: Literal["distill"] = "distill"
    model: str = Field("base", description="The student: a stage or model.")
    teacher_logits: str | None = Field(None, description="A capture_logits stage.")
    teacher_logits_path: str | None = Field(None, description="A folder written by capture_logits.")
    logits_dataset: LogitsDataset | None = None
    loss: Literal["forward_kl", "renormalized", "reverse_kl", "jsd"] = "forward_kl"
    alpha: float = Field(1.0, ge=0, le=1, description="alpha * KD + (1 - alpha) * CE.")
    assistant_only: bool = Field(True, description="Only positions predicting assistant tokens (chat data).")
    chunk_size: int = Field(1024, gt=0, description="Positions per logits chunk.")
    packing: bool = Field(False, description="Concatenate sequences into rows of max_length tokens.")
    max_length: int = Field(2048, gt=0, description="Longest sequence trained on (tokens); with packing, the "
                                                   "packed row length.")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="Sequences longer than max_length are cut or left out; both are counted.")
    test_size: float | int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> "DistillConfig":
        given = [x for x in (self.teacher_logits, self.teacher_logits_path, self.logits_dataset) if x is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of `teacher_logits` (a capture stage), `teacher_logits_path` "
                             "or `logits_dataset`")
        if self.logits_dataset and self.logits_dataset.value_kind == "raw_logits" and self.loss != "renormalized":
            raise ValueError(
                f"loss {self.loss!r} needs full-vocabulary log-probs; raw top-k logits lose the tail mass, "
                "so only loss: renormalized is valid for them")
        return self


class DistillStage(Stage):
    kind = "distill"
    version = "1"
    Config = DistillConfig
    produces = "model"

    def inputs(self, config: DistillConfig) -> dict[str, str]:
        refs = {"model": config.model}
        if config.teacher_logits:
            refs["teacher_logits"] = config.teacher_logits
        return refs

    def keeps_tokenizer(self, config: DistillConfig) -> str | None:
        return "model"

    def local_files(self, config: DistillConfig) -> dict[str, str]:
        if config.logits_dataset and config.logits_dataset.path:
            return {"logits_dataset.path": config.logits_dataset.path}
        if config.teacher_logits_path:
            return {"teacher_logits_path": config.teacher_logits_path}
        return {}

    def validate(self, config: DistillConfig, recipe_dir: Path) -> list[tuple[str, str]]:
        from posttrain.training.speed import speed_problems

        # A plain transformers Trainer: TrainingArguments' fields.
        return check_training_keys(config.training, trl_config=None) + speed_problems(config.training)

    def run(self, config: DistillConfig, ctx: StageContext) -> dict[str, Any]:
        from posttrain.kinds.distill.run import run_distill

        return run_distill(config, ctx)
