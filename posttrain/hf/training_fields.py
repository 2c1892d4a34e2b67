"""Names of trl's SFTConfig / transformers' TrainingArguments fields, read from their source with `ast`.

`validate` must stay fast, and importing transformers takes seconds; the dataclass field names are all
we need to reject a misspelt `training:` key at validation time.
"""
from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from pathlib import Path


def _dataclass_fields(package: str, relative: str, class_name: str) -> set[str]:
    spec = importlib.util.find_spec(package)  # top-level lookup: does not import the package
    if spec is None or not spec.submodule_search_locations:
        return set()
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        return set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    return set()


@lru_cache(maxsize=None)
def trainer_fields(trl_config: tuple[str, str] | None = ("trainer/sft_config.py", "SFTConfig")) -> frozenset[str]:
    """TrainingArguments fields, plus those of a trl config (file, class) when one is given."""
    fields = _dataclass_fields("transformers", "training_args.py", "TrainingArguments")
    if trl_config:
        fields |= _dataclass_fields("trl", *trl_config)
    return frozenset(fields)
