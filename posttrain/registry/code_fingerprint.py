"""A stage's code as part of its entries' keys: a hash of the posttrain code the stage can run.

Key policy (the README's registry section says it to users):

- The code that produces an entry decides whether it can be reused, not a hand-bumped number alone
  (a stage's `version` was bumped by hand and was forgotten). The modules are found statically: the
  stage's module, every posttrain module it imports (also inside functions, where stages import
  their heavy bodies), and so on transitively, plus the chat templates shipped as package data.
- Only what can change an output counts. Docstrings, comments, blank lines and trailing spaces are
  dropped before hashing, so documentation fixes keep every key. The plumbing modules in `NEUTRAL`
  are neither hashed nor followed: they hold the package version, the error classes and their
  messages, the table of stage kinds, signal handling and console output. Upgrading posttrain, a
  clearer error message or a new built-in kind therefore rebuilds nothing; a change to a body a
  stage runs rebuilds that stage's entries and those downstream of them.
- A stage's `version` still forces a rebuild of its kind by hand, for example when a dependency's
  behaviour changes under unchanged code.
- Where code lives does not count, only what it is: the hash covers the files' contents, not their
  paths, and an import of a posttrain module counts by the names it imports, not the module's dotted
  path. Moving a module to another folder (its importers updated), or splitting a package into
  folders, keeps every key; `tests/test_reliability.py` moves modules and checks the flagship's keys.
- Each entry records which files its code hash covered (`code_files` in its key material, left out of
  the key itself), so `plan` names the files that changed when it says a stage will rebuild.
"""
from __future__ import annotations

import ast
import hashlib
import io
import sys
import tokenize
from functools import lru_cache
from pathlib import Path

PACKAGE = "posttrain"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # posttrain/, this file being posttrain/registry/...
DATA_FILES = ("hf/templates/*.jinja",)
# Plumbing that cannot change what a stage writes (see the policy above). Keep this list short: a
# module belongs here only when nothing in it computes, reads or writes a stage's output.
NEUTRAL = frozenset({
    "posttrain",                # __init__: the version and the lazy public API
    "posttrain.core.errors",    # exception classes and their messages
    "posttrain.core.signals",   # turning SIGTERM into a clean stop
    "posttrain.kinds",          # __init__: the table of stage kinds and the plugin lookup
    "posttrain.console",        # progress lines
})


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
        if name in NEUTRAL and name != module:
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


def _span(node: ast.stmt) -> tuple[int, int, int, int]:
    return (node.lineno, node.col_offset, node.end_lineno or node.lineno, node.end_col_offset or 0)


def _package_import(node: ast.Import | ast.ImportFrom, package: str) -> str | None:
    """A posttrain import without the module's dotted path (`from posttrain import a, b as c`), so a
    module moved between folders reads the same to its importers; None for other statements."""
    def names(aliases: list[ast.alias]) -> str:
        return ", ".join(a.name.rpartition(".")[2] + (f" as {a.asname}" if a.asname else "") for a in aliases)

    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
        return f"from {package} import {names(node.names)}"
    if isinstance(node, ast.Import) and all(a.name.split(".")[0] == package for a in node.names):
        return f"import {names(node.names)}"
    return None


def behaviour_text(source: str, package: str = PACKAGE) -> str:
    """Python source without what cannot change behaviour: docstrings, comments, blank lines, trailing
    spaces and the dotted paths of `package`'s own modules in its imports. Worked from the text itself
    (not an AST dump, whose shape differs between Python versions), so one registry serves machines on
    different Pythons."""
    lines = source.splitlines()
    # (start line, start col, end line, end col) -> what replaces it; 1-based lines
    edits: list[tuple[tuple[int, int, int, int], str]] = []
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                edits.append((_span(first), ""))
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            statement = _package_import(node, package)
            if statement is not None:
                edits.append((_span(node), statement))
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                edits.append(((token.start[0], token.start[1], token.end[0], token.end[1]), ""))
    except (tokenize.TokenError, IndentationError):
        pass
    # Comments inside a multi-line import lie within the import's span: the import's edit covers them.
    edits.sort(key=lambda edit: edit[0], reverse=True)
    done: list[tuple[int, int, int, int]] = []
    for (start_line, start_col, end_line, end_col), replacement in edits:
        if any((a, b) <= (start_line, start_col) and (end_line, end_col) <= (c, d) for a, b, c, d in done):
            continue
        head, tail = lines[start_line - 1][:start_col], lines[end_line - 1][end_col:]
        lines[start_line - 1:end_line] = [head + replacement + tail]
        done.append((start_line, start_col, end_line, end_col))
    return "\n".join(line.rstrip() for line in lines if line.strip())


def _file_text(path: Path) -> bytes:
    if path.suffix == ".py":
        return behaviour_text(path.read_text(encoding="utf-8")).encode()
    return path.read_bytes()


def file_digests(files: list[Path], root: Path) -> dict[str, str]:
    """relative path -> sha256 of what of it counts, for saying which files changed."""
    return {path.relative_to(root).as_posix(): hashlib.sha256(_file_text(path)).hexdigest()[:16] for path in files}


def fingerprint_files(files: list[Path], root: Path) -> str:
    """sha256 over the sorted digests of what counts in each file: the files' contents, not their paths
    (a package's `__init__.py` with nothing in it but its docstring counts as nothing)."""
    texts = (_file_text(path) for path in files)
    digests = sorted(hashlib.sha256(text).hexdigest() for text in texts if text.strip())
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def _stage_files(module: str, root: Path) -> tuple[list[Path], Path] | None:
    if module.split(".")[0] != PACKAGE:
        source = getattr(sys.modules.get(module), "__file__", None)  # a plugin: its own module file
        return ([Path(source)], Path(source).parent) if source else None
    files = module_closure(module, root)
    if not files:  # every kind would share one hash: a stage's code must always be found
        raise RuntimeError(f"the source of {module} is not under {root} (a posttrain bug: please report it)")
    for pattern in DATA_FILES:
        files += sorted((root / PACKAGE).glob(pattern))
    return files, root


@lru_cache(maxsize=None)
def code_fingerprint(module: str, root: Path = PACKAGE_ROOT.parent) -> str:
    """sha256 over what counts of the stage module's closure (and posttrain's package data)."""
    found = _stage_files(module, root)
    return fingerprint_files(*found) if found else "unknown"


@lru_cache(maxsize=None)
def code_files(module: str, root: Path = PACKAGE_ROOT.parent) -> dict[str, str]:
    """The files `code_fingerprint` covers, each with its own digest."""
    found = _stage_files(module, root)
    return file_digests(*found) if found else {}
