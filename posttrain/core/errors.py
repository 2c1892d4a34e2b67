"""Errors a user can fix. The CLI prints these as plain lines (never a traceback) and exits non-zero."""
from __future__ import annotations

from dataclasses import dataclass


class UserError(Exception):
    """A problem in the user's recipe, data, files or command line: reported in one clear message."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One located problem: `FILE:LINE: dotted.key.path: message`."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class RecipeError(UserError):
    """Every problem found in a recipe, collected so the user sees them all at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
