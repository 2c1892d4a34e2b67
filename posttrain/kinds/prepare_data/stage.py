"""`kind: prepare_data`: a stage's data, read, normalised, mixed, tokenised once and stored as Arrow.

Recipes do not write this kind: the loader adds one before every stage that reads data (sft, dpo,
capture_logits; eval's held-out data per tokenizer), named `<stage>.<input>`, e.g. `sft.data`. It is keyed by what decides the tokens (the data
config and files, the tokenizer it inherits, the template, max_length and overlong policy, the seed),
so stages and sweep candidates on the same data and tokenizer share one entry: a second SFT with
another learning rate spends no time on data.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from posttrain.data.sources import DataConfig, local_data_files
from posttrain.kinds.base import Stage, StageConfig, StageContext


class PrepareDataConfig(StageConfig):
    kind: Literal["prepare_data"] = "prepare_data"
    model: str = Field(description="Stage or model whose tokenizer tokenises the rows.")
    format: Literal["chat", "preference", "generation"] = "chat"
    data: DataConfig
    assistant_only: bool = Field(True, description="Labels only on assistant tokens (chat rows).")
    chat_template: str | None = None


class PrepareDataStage(Stage):
    kind = "prepare_data"
    version = "1"
    Config = PrepareDataConfig
    produces = "data"
    runs_on_every_rank = False  # rank 0 prepares; the other ranks wait for the entry and map its files
    operational_keys = ("data.workers", "data.decontaminate.workers", "data.warn_skipped_share")

    def inputs(self, config: PrepareDataConfig) -> dict[str, str]:
        return {"model": config.model}

    def local_files(self, config: PrepareDataConfig) -> dict[str, str]:
        return local_data_files(config.data)

    def run(self, config: PrepareDataConfig, ctx: StageContext) -> dict[str, Any]:
        from posttrain.kinds.prepare_data.run import run_prepare

        return run_prepare(config, ctx)
