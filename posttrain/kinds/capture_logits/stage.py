"""`kind: capture_logits`: run a teacher over data and store its top-k (or sampled) log-probs.

The entry is a folder of safetensors shards plus `index.json` with the metadata (teacher, tokenizer
hash, vocab size, k, encoding, temperature, template, data fingerprint) that `distill` reads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from posttrain.data.sources import DataConfig, config_problems, local_data_files
from posttrain.kinds.base import Stage, StageConfig, StageContext
from posttrain.core.strict import StrictModel


class VllmSettings(StrictModel):
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs the teacher is split over (e.g. 8 for 405B).")
    pipeline_parallel_size: int = Field(1, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, gt=0, description="Default: the longest captured sequence.")
    dtype: str = "auto"
    options: dict[str, Any] = Field(default_factory=dict, description="Any other vllm.LLM argument.")


class CaptureConfig(StageConfig):
    kind: Literal["capture_logits"] = "capture_logits"
    teacher: str = Field("base", description="Stage or model whose distribution is stored.")
    data: DataConfig
    k: int = Field(64, gt=0, description="Targets per position (top-k ids, or sampled draws).")
    mode: Literal["topk", "sampled"] = Field("topk", description="sampled: Anshumann et al. 2025 sparse targets.")
    encoding: Literal["fp16", "q8", "q10", "q12", "compact"] = Field(
        "fp16", description="fp16: 2 bytes per value; q8/q10/q12: fixed-width codes; compact: entropy-coded "
                            "ids and values, ~100 B/token at k = 64, V = 128256, 0.0096 nats mean error.")
    mass: float | None = Field(None, gt=0, le=1, description="compact only: per position, store the fewest best "
                               "entries whose probabilities reach this share of the teacher's (at most k); "
                               "the rest joins the stored tail.")
    temperature: float = Field(1.0, gt=0, description="Teacher temperature; distill applies it to the student.")
    batch_size: int = Field(8, gt=0)
    shard_sequences: int = Field(1024, gt=0, description="Sequences per shard (the unit of resume).")
    shard_bytes: int = Field(256_000_000, gt=0, description="Largest shard file, in bytes (a shard is also the "
                                                              "unit of resume; one sequence is never split).")
    chat_template: str | None = None
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf: one process's transformers forward; vllm: vLLM's prompt_logprobs, for teachers "
                          "too large for one process (pip install 'posttrain[vllm]'). Same shards either way.")
    vllm: VllmSettings = Field(default_factory=VllmSettings)


class CaptureLogitsStage(Stage):
    kind = "capture_logits"
    version = "1"
    Config = CaptureConfig
    produces = "logits"
    # How vLLM spreads the teacher over GPUs changes nothing stored (beyond bf16 noise).
    operational_keys = Stage.operational_keys + ("vllm.tensor_parallel_size", "vllm.pipeline_parallel_size",
                                                 "vllm.gpu_memory_utilization")

    def inputs(self, config: CaptureConfig) -> dict[str, str]:
        return {"teacher": config.teacher}

    def prepared_data(self, config: CaptureConfig) -> dict[str, dict[str, Any]]:
        # Assistant-only masks, as an SFT stage's default: both can share one prepared entry.
        return {"data": {"model": config.teacher, "format": "chat", "data": config.data, "assistant_only": True,
                         "chat_template": config.chat_template}}

    def local_files(self, config: CaptureConfig) -> dict[str, str]:
        return local_data_files(config.data)

    def validate(self, config: CaptureConfig, recipe_dir: Path) -> list[tuple[str, str]]:
        problems = config_problems(config.data, recipe_dir)
        if config.data.test_size or config.data.eval_sources:
            problems.append(("data.test_size", "capture stores every row; hold out eval data in the distill stage"))
        if config.encoding == "compact" and config.mode != "topk":
            problems.append(("encoding", "compact stores top-k targets; sampled targets need fp16 or q8/q10/q12"))
        if config.encoding == "compact" and config.k > 8192:
            problems.append(("k", "the compact encoding stores at most 8192 entries per position"))
        if config.mass is not None and config.encoding != "compact":
            problems.append(("mass", "a variable number of entries per position needs encoding: compact"))
        if config.backend == "vllm" and config.mode != "topk":
            problems.append(("mode", "the vllm backend returns top-k log-probs; sampled targets need backend: hf"))
        if config.backend == "vllm" and config.temperature != 1.0:
            problems.append(("temperature", "vLLM's prompt log-probs are the teacher's own (temperature 1); "
                                            "use backend: hf for another temperature"))
        return problems

    def run(self, config: CaptureConfig, ctx: StageContext) -> dict[str, Any]:
        from posttrain.kinds.capture_logits.run import run_capture

        return run_capture(config, ctx)
