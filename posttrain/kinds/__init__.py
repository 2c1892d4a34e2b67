"""Stage kinds: one explicit table for ours, plus the `posttrain.stages` entry-point group for others."""
from __future__ import annotations

import importlib
from functools import lru_cache
from importlib.metadata import entry_points

from posttrain.core.errors import UserError
from posttrain.kinds.base import InputEntry, Stage, StageConfig, StageContext

# kind -> "module:Class". Modules are imported on first use; they import torch & co. only inside run().
BUILTIN_STAGES: dict[str, str] = {
    "model": "posttrain.kinds.model.stage:ModelStage",
    "sft": "posttrain.kinds.sft.stage:SFTStage",
    "dpo": "posttrain.kinds.dpo.stage:DPOStage",
    "capture_logits": "posttrain.kinds.capture_logits.stage:CaptureLogitsStage",
    "recode_logits": "posttrain.kinds.recode_logits.stage:RecodeLogitsStage",
    "distill": "posttrain.kinds.distill.stage:DistillStage",
    "merge": "posttrain.kinds.merge.stage:MergeStage",
    "eval": "posttrain.kinds.eval.stage:EvalStage",
    "prepare_data": "posttrain.kinds.prepare_data.stage:PrepareDataStage",
}

ENTRY_POINT_GROUP = "posttrain.stages"
# Kinds the recipe loader adds by itself; a recipe cannot name them.
INTERNAL_KINDS = frozenset({"prepare_data"})


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
