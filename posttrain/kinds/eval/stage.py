"""`kind: eval`: lm-evaluation-harness on one or more stages, plus cheap built-in metrics.

Standard task names (mmlu, hellaswag, arc_challenge, truthfulqa_mc2, gsm8k, bbh ...) for real runs;
local task YAMLs (with JSONL data) for offline CI; held-out perplexity and exact match on a local
chat file without lm-eval at all. Results (value and stderr) go into the manifest and results.json.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from posttrain.data.sources import DataConfig, local_data_files
from posttrain.core.strict import StrictModel
from posttrain.evaluation.tasks import task_file_problems
from posttrain.kinds.base import Stage, StageConfig, StageContext
from posttrain.core.context import in_recipe


class ExactMatch(StrictModel):
    data: DataConfig = Field(description="Chat rows; the last assistant turn is the reference answer.")
    max_new_tokens: int = Field(32, gt=0)


class EvalVllm(StrictModel):
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs each evaluated model is split over.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, gt=0, description="Default: the model's context length.")
    options: dict[str, Any] = Field(default_factory=dict, description="Any other argument of lm-eval's vllm "
                                                                      "model (vllm.LLM arguments included).")


class EvalConfig(StageConfig):
    kind: Literal["eval"] = "eval"
    models: list[str] = Field(min_length=1, description="Stages or models to evaluate.")
    tasks: list[str] = Field(default_factory=list, description="lm-eval task names (standard or local).")
    task_dirs: list[str] = Field(default_factory=list, description="Folders of local lm-eval task YAMLs.")
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | float | None = Field(None, gt=0, description="Examples per task (for smoke runs).")
    batch_size: int = Field(8, gt=0)
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="How lm-eval runs `tasks`: hf (transformers, the default and the CPU path) or vllm "
                          "(lm-eval's vllm model, for GPUs; pip install 'posttrain[vllm]'). Same results layout. "
                          "The built-in metrics run on transformers either way.")
    vllm: EvalVllm = Field(default_factory=EvalVllm)
    apply_chat_template: bool | Literal["auto"] = Field(
        "auto", description="auto: for post-trained models, not for `kind: model` entries (base models).")
    perplexity: DataConfig | None = Field(None, description="Held-out loss / perplexity on assistant tokens.")
    kl_to: str | None = Field(None, description="A teacher stage/model: mean KL(teacher || model) on the "
                                                "perplexity data's assistant tokens.")
    exact_match: ExactMatch | None = None
    preference: DataConfig | None = Field(None, description="Held-out preference pairs: how often the model "
                                                            "gives chosen a higher log-probability than rejected.")


class EvalStage(Stage):
    kind = "eval"
    version = "1"
    Config = EvalConfig
    produces = "eval"
    operational_keys = Stage.operational_keys + ("batch_size", "vllm.tensor_parallel_size",
                                                 "vllm.gpu_memory_utilization")

    def inputs(self, config: EvalConfig) -> dict[str, str]:
        refs = {f"models.{i}": name for i, name in enumerate(config.models)}
        if config.kl_to:
            refs["kl_to"] = config.kl_to
        return refs

    def prepared_data(self, config: EvalConfig) -> dict[str, dict[str, Any]]:
        """Held-out data, prepared with each evaluated model's tokenizer (models that share a tokenizer
        share one step): token ids and labels for perplexity, pairs for preference, prompts and
        reference answers for exact match."""
        steps: dict[str, dict[str, Any]] = {}
        for i, model in enumerate(config.models):
            if config.perplexity:
                steps[f"perplexity_data.{i}"] = {"model": model, "format": "chat", "data": config.perplexity}
            if config.preference:
                steps[f"preference_data.{i}"] = {"model": model, "format": "preference", "data": config.preference}
            if config.exact_match:
                steps[f"exact_match_data.{i}"] = {"model": model, "format": "generation",
                                                  "data": config.exact_match.data}
        return steps

    def local_files(self, config: EvalConfig) -> dict[str, str]:
        files = {f"task_dirs.{i}": d for i, d in enumerate(config.task_dirs)}
        if config.perplexity:
            files.update({f"perplexity.{k[5:]}": v for k, v in local_data_files(config.perplexity).items()})
        if config.exact_match:
            files.update({f"exact_match.{k}": v for k, v in local_data_files(config.exact_match.data).items()})
        if config.preference:
            files.update({f"preference.{k[5:]}": v for k, v in local_data_files(config.preference).items()})
        return files

    def validate(self, config: EvalConfig, recipe_dir: Path) -> list[tuple[str, str]]:
        if not (config.tasks or config.perplexity or config.exact_match or config.preference):
            return [("tasks", "nothing to evaluate: give tasks, perplexity, exact_match or preference")]
        if config.kl_to and not config.perplexity:
            return [("kl_to", "kl_to is measured on the perplexity data: give perplexity too")]
        if config.backend == "vllm" and not config.tasks:
            return [("backend", "the vllm backend runs lm-eval `tasks`, and there are none (the built-in "
                                "metrics always run on transformers): give tasks, or leave backend at hf")]
        problems = []
        for i, folder in enumerate(config.task_dirs):
            problems += [(f"task_dirs.{i}", message) for message in task_file_problems(in_recipe(folder, recipe_dir))]
        return problems


    def run(self, config: EvalConfig, ctx: StageContext) -> dict[str, Any]:
        from posttrain.kinds.eval.run import run_eval

        return run_eval(config, ctx)
