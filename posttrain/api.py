"""One-call Python API per stage: `posttrain.sft(model=..., data=..., **training)` and friends.

Each call builds a one-stage recipe in memory and runs it through the same validation, registry and
runner as `posttrain run`, so its output is cached, resumable and listed by `posttrain ls`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from posttrain.recipe.load import load_recipe_text
from posttrain.runner import RunResult, run


def run_stage(kind: str, base_model: str | Path, name: str | None = None, registry: str | Path | None = None,
              chat_template: str | None = None, seed: int = 42, base_dir: str | Path = ".",
              models: dict[str, dict] | None = None, **stage: Any) -> RunResult:
    """Run one stage of `kind` whose input is `base_model` (a hub id or a local folder, e.g. an earlier
    entry's path); `stage` holds the stage's own settings."""
    name = name or f"api-{kind}"
    recipe = {
        "name": name,
        "base": {"model": str(base_model), **({"chat_template": chat_template} if chat_template else {})},
        "seed": seed,
        "models": models or {},
        "stages": {kind: {"kind": kind, **stage}},
    }
    text = yaml.safe_dump(_plain(recipe), sort_keys=False)
    loaded = load_recipe_text(text, Path(base_dir).resolve() / f"{name}.yaml", shown=f"posttrain.{kind}()")
    return run(loaded, registry=registry)


def sft(model: str | Path, data: str | Path | dict | list, *, lora: dict | None = None,
        registry: str | Path | None = None, chat_template: str | None = None, seed: int = 42,
        stage: dict | None = None, **training: Any) -> Path:
    """Supervised fine-tuning; returns the output checkpoint folder.

    `data` is a file/folder path, a list of sources, or a full data mapping; `training` takes any
    trl SFTConfig / TrainingArguments field (max_steps=..., learning_rate=...).
    """
    result = run_stage("sft", model, registry=registry, chat_template=chat_template, seed=seed,
                       data=_data(data), training=training, **({"lora": lora} if lora else {}), **(stage or {}))
    return result.path("sft")


def dpo(model: str | Path, data: str | Path | dict | list, *, ref_model: str | Path | None = None,
        beta: float = 0.1, loss_type: str | list[str] = "sigmoid", lora: dict | None = None,
        registry: str | Path | None = None, chat_template: str | None = None, seed: int = 42,
        stage: dict | None = None, **training: Any) -> Path:
    """Direct preference optimisation; returns the output checkpoint folder.

    `ref_model` (a hub id or folder) defaults to `model` itself; `training` takes any trl DPOConfig field.
    """
    extra = dict(stage or {})
    models = {}
    if ref_model is not None:
        models["reference"] = {"model": str(ref_model)}
        extra["ref_model"] = "reference"
    if lora:
        extra["lora"] = lora
    result = run_stage("dpo", model, registry=registry, chat_template=chat_template, seed=seed, models=models,
                       data=_data(data), beta=beta, loss_type=loss_type, training=training, **extra)
    return result.path("dpo")


def capture_logits(teacher: str | Path, data: str | Path | dict | list, *, k: int = 64, encoding: str = "fp16",
                   mode: str = "topk", registry: str | Path | None = None, chat_template: str | None = None,
                   seed: int = 42, **stage: Any) -> Path:
    """Store a teacher's top-k (or sampled) log-probs over `data`; returns the shard folder."""
    result = run_stage("capture_logits", teacher, registry=registry, chat_template=chat_template, seed=seed,
                       teacher="base", data=_data(data), k=k, encoding=encoding, mode=mode, **stage)
    return result.path("capture_logits")


def distill(model: str | Path, teacher_logits: str | Path | None = None, *, logits_dataset: dict | None = None,
            loss: str = "forward_kl", alpha: float = 1.0, registry: str | Path | None = None,
            chat_template: str | None = None, seed: int = 42, stage: dict | None = None, **training: Any) -> Path:
    """Train `model` on stored teacher logits (a capture folder, or a dataset in the arcee-ai layout)."""
    source = {"teacher_logits_path": str(teacher_logits)} if teacher_logits else {"logits_dataset": logits_dataset}
    result = run_stage("distill", model, registry=registry, chat_template=chat_template, seed=seed,
                       loss=loss, alpha=alpha, training=training, **source, **(stage or {}))
    return result.path("distill")


def _data(data) -> dict:
    if isinstance(data, dict):
        return data
    if isinstance(data, list):
        return {"sources": data}
    return {"sources": [{"path": str(data)}]}


def _plain(value):
    """Paths and tuples to YAML-safe types."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
