"""Checks and copies of Hugging Face model folders (safetensors only: pickled weights are refused)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def missing_parts(folder: Path, need_tokenizer: bool = True) -> list[str]:
    """What a folder lacks to be a loadable causal LM checkpoint, each with how to fix it."""
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json (the model config; save the model with save_pretrained)")
    has_safetensors = any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()
    if not has_safetensors:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            missing.append(
                "*.safetensors weights (only pickled .bin/.pt weights found, which posttrain never loads; "
                "convert with model.save_pretrained(folder, safe_serialization=True))"
            )
        else:
            missing.append("*.safetensors weights")
    if need_tokenizer and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer.json or tokenizer.model (save the tokenizer with tokenizer.save_pretrained)")
    return missing


def link_or_copy_tree(src: Path, dst: Path, link_suffixes: tuple[str, ...] = (".safetensors",)) -> None:
    """Copy a folder, hard-linking large weight files when possible to save space and time.

    Only weight files are linked: small files (configs, tokenizer) are copied, because stages rewrite
    them and writing through a hard link would change the user's original folder.
    """
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or path.is_dir():
            continue  # hub snapshot internals (.cache, .gitattributes) are not part of the model
        if path.suffix in (".bin", ".pt", ".pth", ".pkl"):
            continue  # pickles never enter the registry
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        real = path.resolve()
        if path.suffix in link_suffixes:
            try:
                os.link(real, target)
                continue
            except OSError:
                pass  # another filesystem, or links not supported: copy instead
        shutil.copy2(real, target)
