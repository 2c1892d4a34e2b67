"""Deep merge of profiles over recipes, and `key=value` command-line overrides."""
from __future__ import annotations

import copy
from typing import Any

import yaml

from posttrain.core.errors import Problem
from posttrain.recipe.yaml_lines import load_value

COMMAND_LINE = "command line"


def deep_merge(base: Any, over: Any) -> Any:
    """Mappings merge key by key; anything else (lists, scalars, null) in `over` replaces `base`."""
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            merged[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(over)


def leaf_paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path that ends at a non-mapping value (or an empty mapping)."""
    if isinstance(data, dict) and data:
        return [p for key, value in data.items() for p in leaf_paths(value, prefix + (key,))]
    return [prefix]


def parse_overrides(items: list[str]) -> tuple[dict, list[Problem]]:
    """`a.b.c=value` items into a nested mapping; values are parsed as YAML (`lr=2e-5` is a float)."""
    result: dict = {}
    problems: list[Problem] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(Problem(COMMAND_LINE, None, key or item, f"override {item!r} must look like key.path=value"))
            continue
        try:
            value = load_value(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            problems.append(Problem(COMMAND_LINE, None, key, f"value {raw!r} is not valid YAML: {exc}"))
            continue
        parts = key.split(".")
        node = result
        for part in parts[:-1]:
            existing = node.get(part)
            if not isinstance(existing, dict):
                node[part] = existing = {}
            node = existing
        node[parts[-1]] = value
    return result, problems
