"""No import runs up the floors, and the floors are folders: each posttrain module imports only modules on
its floor or below.

Floors, from the ground up: `core/` (errors, the strict config base, the stage context, signals) ->
building blocks (`data/`, `kd/`, `registry/`, `hf/`, `evaluation/`, `console/`) -> shared training
plumbing (`training/`) -> the stage kinds (`kinds/`: one package per kind, its config, declaration,
body and hooks together; what plugins implement) -> recipes and plans (`recipe/`, `planning/`) -> the
entry points (the runner, the executors, publishing, the API, the report and the CLI). Imports inside
functions count too.
"""
from __future__ import annotations

import pytest

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "posttrain"
FLOORS = [
    ("core", ["posttrain.core"]),
    ("blocks", ["posttrain.data", "posttrain.kd", "posttrain.registry", "posttrain.hf", "posttrain.evaluation",
                "posttrain.console"]),
    ("training plumbing", ["posttrain.training"]),
    ("stage kinds", ["posttrain.kinds"]),
    ("recipes and plans", ["posttrain.recipe", "posttrain.planning"]),
    ("entry points", ["posttrain.runner", "posttrain.execution", "posttrain.publish", "posttrain.api", "posttrain.report",
                      "posttrain.cli", "posttrain"]),
]
# The only modules at the package's top: the entry points (everything else lives in a floor's folder).
ENTRY_POINTS = {"__init__.py", "api.py", "cli.py", "report.py", "runner.py"}


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


def test_the_floors_are_folders():
    loose = {path.name for path in PACKAGE.glob("*.py")}
    assert loose == ENTRY_POINTS, f"modules at the package top that belong in a floor's folder: {sorted(loose - ENTRY_POINTS)}"
    folders = {path.name for path in PACKAGE.iterdir() if path.is_dir() and (path / "__init__.py").exists()}
    on_floors = {prefix.split(".")[1] for _, prefixes in FLOORS for prefix in prefixes if prefix.count(".") == 1}
    assert folders <= on_floors, f"folders on no floor: {sorted(folders - on_floors)}"


def test_each_kind_is_one_package_that_imports_no_other_kind():
    """A kind's config, declaration and body live together (kinds/<kind>/stage.py and run.py), and a kind
    reaches another kind's code only through the floors below (so changing one kind never touches another)."""
    from posttrain.kinds import BUILTIN_STAGES

    for kind, target in BUILTIN_STAGES.items():
        module = target.partition(":")[0]
        assert module.endswith(".stage") and (PACKAGE.parent / module.replace(".", "/")).with_suffix(".py").is_file(), target
    crossing = []
    for folder in sorted(p for p in (PACKAGE / "kinds").iterdir() if (p / "__init__.py").exists()):
        own = f"posttrain.kinds.{folder.name}"
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                targets = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                for target in targets:
                    if target.startswith("posttrain.kinds.") and target != "posttrain.kinds.base" \
                            and not (target == own or target.startswith(own + ".")):
                        crossing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {target}")
    assert not crossing, "\n".join(crossing)


@pytest.mark.slow
def test_a_kinds_hooks_are_on_its_stage_and_outside_its_key():
    """What a kind knows about its own runs (plan's memory estimate, the headline metric, the curves,
    whether it spreads over a launch) is asked of its Stage, lives in kinds/<kind>/hooks.py, and is in
    no kind's code hash: editing an estimate or a label rebuilds nothing."""
    from posttrain.kinds import BUILTIN_STAGES, get_stage
    from posttrain.planning.memory import KNOWN_ARCHITECTURES, Launch, architecture_of
    from posttrain.registry.code_fingerprint import code_files

    for kind, target in BUILTIN_STAGES.items():
        hashed = code_files(target.partition(":")[0])
        assert hashed and not any(f.endswith(("/hooks.py", "/memory_model.py")) for f in hashed), (kind, hashed)
    assert get_stage("distill").curves()["kd_loss"] == "KD loss"
    assert "rewards_accuracies" in get_stage("dpo").curves()
    assert get_stage("capture_logits").headline_metrics() == ("bytes_per_token",)
    assert get_stage("sft").headline_metrics()[0] == "final_train_loss"
    assert {kind for kind in BUILTIN_STAGES if get_stage(kind).spreads_over_launch()} == {"sft", "dpo", "distill"}
    assert get_stage("count").spreads_over_launch() is False  # the test plugin declares nothing
    arch = architecture_of(next(iter(KNOWN_ARCHITECTURES)), PACKAGE)
    config = get_stage("eval").Config(kind="eval", models=["base"], tasks=["t"])
    assert get_stage("eval").memory_estimate(config, arch, Launch()).endswith("/device (bf16 inference)")
    assert "select" not in BUILTIN_STAGES  # a selection is a node of the graph, not a stage kind
