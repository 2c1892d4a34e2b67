"""A stage's code as part of its entries' keys: a hash of every posttrain module the stage can run.

A stage's `version` is bumped by hand and was forgotten; the code that produces an entry is what
should decide whether it can be reused. The modules are found statically: the stage's module, every
posttrain module it imports (also inside functions, where stages import their heavy bodies), and so
on transitively, plus the chat templates shipped as package data. A change to any of them changes the
keys of that stage kind's entries (and so of everything downstream): they rebuild. Modules the stage
never reaches (the CLI, the report) do not matter.
"""
from __future__ import annotations

import ast
import hashlib
import sys
from functools import lru_cache
from pathlib import Path

PACKAGE = "posttrain"
PACKAGE_ROOT = Path(__file__).resolve().parent
DATA_FILES = ("templates/*.jinja",)


def _module_file(name: str, root: Path) -> Path | None:
    """The source file of `posttrain.x.y` under `root` (the folder holding the posttrain package)."""
    parts = name.split(".")
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, package: str) -> set[str]:
    """Every module of `package` that `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == package}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import submodule`
    return found


def module_closure(module: str, root: Path = PACKAGE_ROOT.parent) -> list[Path]:
    """Source files of `module` and of every package module it reaches through imports, sorted."""
    package = module.split(".")[0]
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name, root)
        if path is None:
            continue  # an attribute imported from a module, not a module
        seen[name] = path
        todo.extend(_imports(path, package))
        parent = name.rpartition(".")[0]
        if parent and parent not in seen:
            todo.append(parent)  # importing a.b runs a/__init__.py too
    return sorted(set(seen.values()))


def fingerprint_files(files: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@lru_cache(maxsize=None)
def code_fingerprint(module: str, root: Path = PACKAGE_ROOT.parent) -> str:
    """sha256 over the stage module's closure (and posttrain's package data, for posttrain stages)."""
    if module.split(".")[0] != PACKAGE:
        source = getattr(sys.modules.get(module), "__file__", None)  # a plugin: its own module file
        if source is None:
            return "unknown"
        return fingerprint_files([Path(source)], Path(source).parent)
    files = module_closure(module, root)
    for pattern in DATA_FILES:
        files += sorted((root / PACKAGE).glob(pattern))
    return fingerprint_files(files, root)
