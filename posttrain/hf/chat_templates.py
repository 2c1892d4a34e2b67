"""Chat templates by name, file or inline text, and the end-of-turn token each one uses.

A wrong template or EOS is the most common way a post-trained model ends up broken (INTELLECT-1 with a
ChatML template started SFT at loss ~15 instead of ~1.1), so the template and the EOS travel together.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from posttrain.core.errors import UserError
from posttrain.core.context import in_recipe


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # a known name, a file path, or "inline"
    text: str
    end_of_turn: str | None  # the token that ends an assistant turn, when known


# name -> (template file shipped with posttrain, end-of-turn token)
KNOWN_TEMPLATES: dict[str, tuple[str, str]] = {
    "llama-3.1": ("llama-3.1.jinja", "<|eot_id|>"),
}
ALIASES = {"llama3.1": "llama-3.1", "llama-3": "llama-3.1", "llama3": "llama-3.1"}


def is_template_file(value: str) -> bool:
    return value.endswith((".jinja", ".jinja2", ".j2"))


def resolve_chat_template(value: str, recipe_dir: Path) -> ChatTemplate:
    """Turn a recipe's `chat_template:` value into template text."""
    name = ALIASES.get(value, value)
    if name in KNOWN_TEMPLATES:
        filename, eot = KNOWN_TEMPLATES[name]
        text = resources.files("posttrain.hf").joinpath("templates", filename).read_text()
        return ChatTemplate(name, text, eot)
    if is_template_file(value):
        path = in_recipe(value, recipe_dir)
        if not path.is_file():
            raise UserError(f"chat template file not found: {path}")
        text = path.read_text()
        return ChatTemplate(str(path), text, guess_end_of_turn(text))
    if "{{" in value or "{%" in value:
        return ChatTemplate("inline", value, guess_end_of_turn(value))
    known = ", ".join(sorted(KNOWN_TEMPLATES))
    raise UserError(f"unknown chat template {value!r}: use one of {known}, a .jinja file, or the template text")


def guess_end_of_turn(text: str) -> str | None:
    """The end-of-turn token of common template families, recognised by their markers."""
    for token in ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>"):
        if token in text:
            return token
    return None


def template_problems(value: str | None, recipe_dir: Path, key: str = "chat_template") -> list[tuple[str, str]]:
    """Validation problems of a recipe's `chat_template:` value, as (dotted key, message)."""
    if not value:
        return []
    try:
        resolve_chat_template(value, recipe_dir)
    except UserError as exc:
        return [(key, str(exc))]
    return []


def end_of_turn_problems(value: str | None, recipe_dir: Path, tokenizer_folder: Path,
                         key: str = "chat_template") -> list[tuple[str, str]]:
    """The template's end-of-turn token must exist in a local tokenizer (checked without loading it)."""
    if not value:
        return []
    try:
        template = resolve_chat_template(value, recipe_dir)
    except UserError:
        return []  # reported by template_problems
    vocabulary = tokenizer_folder / "tokenizer.json"
    if not template.end_of_turn or not vocabulary.is_file():
        return []
    if f'"{template.end_of_turn}"' not in vocabulary.read_text(encoding="utf-8", errors="replace"):
        return [(key, f"template {template.name!r} ends turns with {template.end_of_turn!r}, which the tokenizer "
                      f"in {tokenizer_folder} does not have (choose a template made for this tokenizer)")]
    return []
