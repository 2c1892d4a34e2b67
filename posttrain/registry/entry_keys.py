"""Entry keys: a sha256 over canonical JSON of everything that determines a stage's output (as DVC does)."""
from __future__ import annotations

import hashlib
import json
from typing import Any

SHORT = 12


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def entry_key(material: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()


def short(key: str) -> str:
    return key[:SHORT]
