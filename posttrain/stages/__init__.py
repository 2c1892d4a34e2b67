"""Stage kinds: one explicit table for ours, plus the `posttrain.stages` entry-point group for others."""
from __future__ import annotations

import importlib
from functools import lru_cache
from importlib.metadata import entry_points

from posttrain.errors import UserError
from posttrain.stages.base import InputEntry, Stage, StageConfig, StageContext

# kind -> "module:Class". Modules are imported on first use; they import torch & co. only inside run().
BUILTIN_STAGES: dict[str, str] = {
    "model": "posttrain.stages.model:ModelStage",
    "sft": "posttrain.stages.sft:SFTStage",
    "dpo": "posttrain.stages.dpo:DPOStage",
    "capture_logits": "posttrain.stages.capture_logits:CaptureLogitsStage",
    "recode_logits": "posttrain.stages.recode_logits:RecodeLogitsStage",
    "distill": "posttrain.stages.distill:DistillStage",
    "merge": "posttrain.stages.merge:MergeStage",
    "eval": "posttrain.stages.evaluate:EvalStage",
    "prepare_data": "posttrain.stages.prepare_data:PrepareDataStage",
    "select": "posttrain.stages.select:SelectStage",
}

ENTRY_POINT_GROUP = "posttrain.stages"
# Kinds the recipe loader adds by itself; a recipe cannot name them.
INTERNAL_KINDS = frozenset({"prepare_data", "select"})


@lru_cache(maxsize=1)
def _plugin_targets() -> dict[str, str]:
    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in BUILTIN_STAGES:  # ours win: a plugin cannot silently replace a built-in kind
            found[ep.name] = ep.value
    return found


def known_kinds() -> list[str]:
    """The kinds a recipe may name."""
    return sorted((set(BUILTIN_STAGES) | set(_plugin_targets())) - INTERNAL_KINDS)


@lru_cache(maxsize=None)
def get_stage(kind: str) -> Stage:
    target = BUILTIN_STAGES.get(kind) or _plugin_targets().get(kind)
    if target is None:
        raise UserError(f"unknown stage kind {kind!r}; known kinds: {', '.join(known_kinds())}")
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
        stage = cls()
    except (ImportError, AttributeError, TypeError) as exc:  # TypeError: an abstract method left out
        raise UserError(f"stage kind {kind!r} could not be loaded from {target!r}: {exc}") from exc
    if getattr(stage, "kind", None) != kind:
        raise UserError(f"stage kind {kind!r} at {target!r} declares kind {getattr(stage, 'kind', None)!r}")
    return stage


__all__ = ["BUILTIN_STAGES", "INTERNAL_KINDS", "InputEntry", "Stage", "StageConfig", "StageContext", "get_stage", "known_kinds"]
