"""Load YAML safely while remembering the line of every key, so errors can say `FILE:LINE: key`."""
from __future__ import annotations

import re
from typing import Any

import yaml

from posttrain.core.errors import Problem

KeyPath = tuple[Any, ...]


class RecipeLoader(yaml.SafeLoader):
    """The safe loader, reading `2e-5` as the float people mean (YAML 1.1 wants `2.0e-5` and would give
    the string "2e-5", which a trainer then refuses or, worse, compares as text)."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_value(text: str) -> Any:
    """One YAML value (e.g. of a command-line override), read as recipe files are."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader


def load_yaml_with_lines(text: str, filename: str) -> tuple[Any, dict[KeyPath, int], list[Problem]]:
    """Parse `text` with the safe loader.

    Returns the data, a map from key path (tuple of keys / list indices) to its 1-based line, and the
    problems found (syntax errors and duplicate keys, which plain `safe_load` would silently accept).
    """
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}, []
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        message = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        return None, {}, [Problem(filename, line, "", f"invalid YAML: {message}")]
    except yaml.YAMLError as exc:
        return None, {}, [Problem(filename, None, "", f"invalid YAML: {exc}")]
    finally:
        loader.dispose()
    lines: dict[KeyPath, int] = {(): node.start_mark.line + 1}
    problems: list[Problem] = []
    _walk(loader, node, (), lines, problems, filename)
    return data, lines, problems


def _walk(loader: yaml.SafeLoader, node: yaml.Node, path: KeyPath, lines: dict, problems: list, filename: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue
            child = path + (key,)
            if key in seen:
                dotted = ".".join(str(k) for k in child)
                problems.append(Problem(filename, key_node.start_mark.line + 1, dotted, "duplicate key"))
            seen.add(key)
            lines[child] = key_node.start_mark.line + 1
            _walk(loader, value_node, child, lines, problems, filename)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = path + (index,)
            lines[child] = item.start_mark.line + 1
            _walk(loader, item, child, lines, problems, filename)
