"""No import runs up the floors: each posttrain module imports only modules on its floor or below.

Floors, from the ground up: shared types (errors, the strict config base, the stage context, signals)
-> building blocks (data, distillation maths, registry, templates, folders) -> stage bodies
(`training/`) -> stage declarations (`stages/`, what plugins implement) -> recipes and keys -> the
runner, API, report and CLI. Imports inside functions count too.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "posttrain"
FLOORS = [
    ("ground", ["posttrain.errors", "posttrain.strict", "posttrain.context", "posttrain.signals"]),
    ("blocks", ["posttrain.data", "posttrain.kd", "posttrain.registry", "posttrain.chat_templates",
                "posttrain.checkpoint_folder", "posttrain.code_fingerprint", "posttrain.console", "posttrain.eval_tasks",
                "posttrain.fingerprint", "posttrain.gates", "posttrain.hf_folder", "posttrain.model_card",
                "posttrain.objective",
                "posttrain.tokenizer_setup", "posttrain.training_fields"]),
    ("stage bodies", ["posttrain.training"]),
    ("stage declarations", ["posttrain.stages"]),
    ("recipes", ["posttrain.recipe", "posttrain.keys", "posttrain.memory", "posttrain.schema"]),
    ("top", ["posttrain.runner", "posttrain.execution", "posttrain.publish", "posttrain.api", "posttrain.report", "posttrain.cli", "posttrain"]),
]


def floor_of(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{module} is on no floor: add it to FLOORS"
    return best[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_from_a_higher_floor():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        here = floor_of(name)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module]
            for target in targets:
                if target.split(".")[0] != "posttrain" or target == "posttrain":
                    continue
                there = floor_of(target)
                if there > here:
                    upward.append(f"{name} ({FLOORS[here][0]}) imports {target} ({FLOORS[there][0]}), line {node.lineno}")
    assert not upward, "\n".join(upward)
