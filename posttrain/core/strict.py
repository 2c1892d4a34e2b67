"""The ground floor of configuration: strict pydantic models, names that are safe as folder names, and
the spec of a starting model. Everything that validates settings builds on these; they import nothing
else of posttrain."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Names become directory names in the registry (`refs/<recipe>/<stage>`), so they are restricted to
# characters that cannot form a path separator or a parent reference.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
_NAME_RE = re.compile(NAME_PATTERN)
RESERVED_NAMES = {"base"}


def check_name(value: str, what: str = "name") -> str:
    if not _NAME_RE.match(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} must start with a letter or digit and use only letters, digits, '_', '.', '-' "
            "(and no '..')"
        )
    return value


class StrictModel(BaseModel):
    """Unknown keys are errors, never silently ignored (a typo must not become a default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(StrictModel):
    """A model the recipe starts from: a hub id (with revision) or a local Hugging Face folder."""

    model: str = Field(description="Hub id (org/name) or local folder, relative to the recipe file.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit). Pin it for reproducibility.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype the stages load this model in."
    )
    tokenizer: str | None = Field(None, description="Tokenizer hub id or folder; defaults to the model's own.")
    chat_template: str | None = Field(
        None,
        description="A known template name (e.g. 'llama-3.1'), a path to a .jinja file, or the template text.",
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with the model. Only when you trust it.")
