"""Rough per-device memory estimates for `posttrain plan`, computed offline from model configs.

This module finds each stage's architecture (a local config.json, the HF cache, or the table of
published ones below) and the recipe's launch, then asks the stage's `memory_estimate` hook. The
rules of thumb behind the numbers are in `training/memory_model.py`. Estimates are for planning, not
guarantees.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posttrain.kinds import get_stage
from posttrain.training.memory_model import Architecture, Launch
from posttrain.core.context import in_recipe

__all__ = ["KNOWN_ARCHITECTURES", "Architecture", "Launch", "architecture_of", "estimate", "estimates_for", "launch_of",
           "training_bytes"]

# Published architectures, so `plan` works with no download (config.json fields of each model).
KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "PrimeIntellect/INTELLECT-1": {"num_hidden_layers": 42, "hidden_size": 4096, "intermediate_size": 14336,
                                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                                   "tie_word_embeddings": False},
    "meta-llama/Llama-3.1-8B": {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
                                "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                                "tie_word_embeddings": False},
    "meta-llama/Llama-3.1-70B": {"num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672,
                                 "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                                 "tie_word_embeddings": False},
    "meta-llama/Llama-3.1-405B": {"num_hidden_layers": 126, "hidden_size": 16384, "intermediate_size": 53248,
                                  "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256,
                                  "tie_word_embeddings": False},
}
for _name in list(KNOWN_ARCHITECTURES):
    KNOWN_ARCHITECTURES[_name + "-Instruct"] = KNOWN_ARCHITECTURES[_name]
KNOWN_ARCHITECTURES["PrimeIntellect/INTELLECT-1-Instruct"] = KNOWN_ARCHITECTURES["PrimeIntellect/INTELLECT-1"]


def architecture_of(model: str, recipe_dir: Path) -> Architecture | None:
    """From a local folder's config.json, the local HF cache, or the table above; None if unknown."""
    config = None
    local = in_recipe(model, recipe_dir)
    if (local / "config.json").is_file():
        config = json.loads((local / "config.json").read_text())
    elif model in KNOWN_ARCHITECTURES:
        config = KNOWN_ARCHITECTURES[model]
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
            if isinstance(cached, str):
                config = json.loads(Path(cached).read_text())
        except Exception:  # noqa: BLE001 - an estimate is optional; never fail `plan` over it
            config = None
    if not config or "hidden_size" not in config:
        return None
    heads = config.get("num_attention_heads", 1)
    return Architecture(config.get("num_hidden_layers", 0), config["hidden_size"],
                        config.get("intermediate_size", 4 * config["hidden_size"]), heads,
                        config.get("num_key_value_heads", heads), config.get("vocab_size", 0),
                        bool(config.get("tie_word_embeddings", False)),
                        str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"))


def launch_of(recipe_launch, recipe_dir: Path) -> Launch:
    """The engine and precision of a recipe's `launch:` (its accelerate config read with safe_load)."""
    import yaml

    engine, mixed = "ddp", False
    if recipe_launch.accelerate_config:
        path = in_recipe(recipe_launch.accelerate_config, recipe_dir)
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            config = {}
        engine = {"FSDP": "fsdp", "DEEPSPEED": "deepspeed"}.get(str(config.get("distributed_type")), "ddp")
        if engine == "deepspeed" and (config.get("deepspeed_config") or {}).get("zero_stage", 3) < 3:
            engine = "ddp"  # ZeRO-1/2 shard optimizer state only; counted as replicated (an upper bound)
        mixed = str(config.get("mixed_precision", "no")) in ("bf16", "fp16")
    return Launch(recipe_launch.num_processes, engine, mixed)


def training_bytes(kind: str, config: Any, arch: Architecture, launch: Launch) -> dict[str, float]:
    """The parts of one training process's peak, in bytes, as the kind's hooks count them."""
    return get_stage(kind).memory_parts(config, arch, launch)


def estimate(kind: str, config: Any, arch: Architecture, launch: Launch | int) -> str:
    """A one-line estimate for one stage, from its kind's hooks ("-" when the kind has none)."""
    if isinstance(launch, int):
        launch = Launch(launch, "fsdp" if launch > 1 else "ddp")
    return get_stage(kind).memory_estimate(config, arch, launch) or "-"


def source_model(loaded, name: str) -> str | None:
    """The hub id or folder a stage's architecture comes from (following its first model input)."""
    seen = set()
    while name not in seen:
        seen.add(name)
        item = loaded.stages[name]
        if item.kind == "model":
            return item.config.model
        refs = list(item.inputs.values())
        if not refs:
            return None
        name = refs[0]
    return None


def estimates_for(loaded) -> dict[str, str]:
    """One estimate per stage of a loaded recipe; each model's architecture is read once."""
    architectures: dict[str, Architecture | None] = {}
    found = {}
    launch = launch_of(loaded.recipe.launch, loaded.dir)
    for name in loaded.order:
        item = loaded.stages[name]
        model = source_model(loaded, name)
        if model is not None and model not in architectures:
            architectures[model] = architecture_of(model, loaded.dir)
        arch = architectures.get(model) if model else None
        if item.kind == "select":
            found[name] = "-"  # a selection builds nothing
            continue
        found[name] = ((item.stage.memory_estimate(item.config, arch, launch) or "-") if arch
                       else "unknown architecture (no config.json offline)")
    return found
