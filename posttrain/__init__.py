"""posttrain: post-train a base model into an instruct model from one YAML recipe.

The public API is loaded lazily so `import posttrain` (and the CLI's quick verbs) stay fast.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "run": ("posttrain.runner", "run"),
    "sft": ("posttrain.api", "sft"),
    "dpo": ("posttrain.api", "dpo"),
    "capture_logits": ("posttrain.api", "capture_logits"),
    "distill": ("posttrain.api", "distill"),
    "run_stage": ("posttrain.api", "run_stage"),
    "plan": ("posttrain.runner", "plan"),
    "load_recipe": ("posttrain.recipe", "load_recipe"),
    "Registry": ("posttrain.registry", "Registry"),
    "UserError": ("posttrain.core.errors", "UserError"),
    "RecipeError": ("posttrain.core.errors", "RecipeError"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'posttrain' has no attribute {name!r}")


__all__ = sorted(_LAZY)
