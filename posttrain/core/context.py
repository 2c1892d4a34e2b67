"""What a running stage is handed besides its config: its inputs, its folders, its rank, its log.

On the ground floor so every floor above shares it."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


def in_recipe(path: str | Path, recipe_dir: Path) -> Path:
    """A path as a recipe writes it: `~` expanded, and relative to the recipe's folder (so a recipe runs
    from any directory). Every path a recipe names goes through here."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else recipe_dir / p


@dataclass(frozen=True)
class InputEntry:
    """A finished registry entry a stage reads from."""

    key: str
    path: Path
    kind: str
    manifest: dict[str, Any]


@dataclass
class StageContext:
    """Everything a running stage may use besides its config."""

    name: str
    inputs: dict[str, InputEntry]
    out_dir: Path  # fresh and empty; everything written here becomes the entry
    work_dir: Path  # survives failures and kills: keep in-stage checkpoints here to resume
    recipe_dir: Path
    seed: int
    rank: int = 0
    world_size: int = 1
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("posttrain.stage"))
    # Progress for the console: {"step", "total", "loss", ...}; a no-op unless the runner shows it.
    progress: Callable[[dict[str, Any]], None] = field(default=lambda info: None)
    # A folder of results keyed by the content of what made them, shared by all runs on this registry
    # (e.g. one model's evaluation, reused when an eval stage's model list grows); None: no reuse.
    results_cache: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def resolve(self, path: str | Path) -> Path:
        """Paths in a recipe are relative to the recipe file, so a recipe runs from any directory."""
        return in_recipe(path, self.recipe_dir)
