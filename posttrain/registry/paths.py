"""Paths inside the registry. Every name is checked so nothing can escape the registry folder."""
from __future__ import annotations

import re
from pathlib import Path

from posttrain.core.errors import UserError

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
# '[', ']', '=' and ',' for sweep candidates' refs (`sft[learning_rate=1e-05,seed=1]`).
_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+=,\[\]-]{0,199}$")


def check_key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise UserError(f"not a registry key: {key!r}")
    return key


def safe_child(root: Path, *parts: str) -> Path:
    """root/part/part..., refusing separators, '..' and anything that resolves outside root."""
    for part in parts:
        if not _PART_RE.match(part) or ".." in part:
            raise UserError(f"invalid registry name {part!r}: use letters, digits, '_', '.', '@', '+', '-' "
                            "(and '[', ']', '=', ',' as sweep candidates do)")
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise UserError(f"registry name {'/'.join(parts)!r} would escape the registry folder")
    return path
