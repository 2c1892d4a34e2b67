"""`kind: merge`: merge checkpoints with mergekit (as a library; no method is re-implemented here).

Deterministic by construction: `base_model` is always explicit, so the config, tokenizer, chat
template and generation config come from a known donor (we copy them ourselves rather than rely on
mergekit's choice); stochastic methods get `random_seed`; the output folder is always fresh; the model
card is ours (mergekit's calls the hub for short relative paths).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.core.strict import StrictModel
from posttrain.kinds.base import Stage, StageConfig, StageContext


class MergeInput(StrictModel):
    model: str = Field(description="A stage or model.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="Per-model method parameters.")


class MergeConfig(StageConfig):
    kind: Literal["merge"] = "merge"
    method: str = Field(description="Any mergekit merge method: linear, ties, dare_ties, slerp, ...")
    base_model: str | None = Field(None, description="Base / donor model; default: the first model.")
    models: list[MergeInput] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict, description="Method parameters for all models.")
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    out_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    tokenizer_source: Literal["base", "union"] = "base"
    options: dict[str, Any] = Field(default_factory=dict, description="mergekit MergeOptions fields.")
    # Excluded from the dump (so from the key): once folded in, it is the models' own `weight`.
    weights: list[float] | None = Field(None, exclude=True, description="Each model's `weight`, in the order of "
                                        "`models`: a shorthand for writing it under each model (handy in sweeps).")

    @model_validator(mode="before")
    @classmethod
    def _fold_weights(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("weights") is None:
            return data
        weights, models = data["weights"], data.get("models")
        if not isinstance(weights, list) or not isinstance(models, list):
            return data  # the field types report it
        if len(weights) != len(models):
            raise ValueError(f"`weights` has {len(weights)} values for {len(models)} models")
        folded = []
        for i, (item, weight) in enumerate(zip(models, weights)):
            item = {"model": item} if isinstance(item, str) else item
            if isinstance(item, dict):
                parameters = dict(item.get("parameters") or {})
                if "weight" in parameters:
                    raise ValueError(f"model {i} has a weight under its parameters and in `weights`: give one")
                item = {**item, "parameters": {**parameters, "weight": weight}}
            folded.append(item)
        return {**data, "models": folded}


class MergeStage(Stage):
    kind = "merge"
    version = "1"
    Config = MergeConfig
    produces = "model"

    def keeps_tokenizer(self, config: MergeConfig) -> str | None:
        return "base_model" if config.tokenizer_source == "base" else None  # its files are copied as they are

    def inputs(self, config: MergeConfig) -> dict[str, str]:
        refs = {f"models.{i}.model": item.model for i, item in enumerate(config.models)}
        refs["base_model"] = config.base_model or config.models[0].model
        return refs

    def deep_validate(self, config: MergeConfig, recipe_dir: Path) -> list[tuple[str, str]]:
        """mergekit's own models check the merge (its import takes seconds, through torch); the answer
        is cached by the merge settings, the mergekit version and our merge code, so a warm `validate`
        of an unchanged merge imports nothing."""
        import hashlib
        import json
        import os
        from importlib.metadata import version

        from posttrain.registry.code_fingerprint import code_fingerprint
        from posttrain.registry.entry_keys import canonical_json
        from posttrain.kinds.merge import run as merge_run

        material = {"config": config.model_dump(mode="json"), "mergekit": version("mergekit"),
                    "code": code_fingerprint(merge_run.__name__)}
        cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "posttrain" / "validate"
        cached = cache_root / f"merge-{hashlib.sha256(canonical_json(material).encode()).hexdigest()[:32]}.json"
        if cached.is_file():
            try:
                return [tuple(problem) for problem in json.loads(cached.read_text())]
            except (OSError, ValueError):
                pass
        from posttrain.kinds.merge.run import check_merge_config

        problems = check_merge_config(config)
        try:
            cache_root.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(problems))
        except OSError:
            pass  # a read-only home: validate stays correct, just not faster
        return problems

    def run(self, config: MergeConfig, ctx: StageContext) -> dict[str, Any]:
        from posttrain.kinds.merge.run import run_merge_stage

        return run_merge_stage(config, ctx)
