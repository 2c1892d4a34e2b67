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


WEIGHT_SUFFIXES = (".safetensors",)


def copy_model_folder(src: Path, dst: Path, allowed_root: Path | None = None, weights: bool = True) -> None:
    """Copy a model folder into the registry: never a hard link, so the registry and the user's folder
    never share bytes, and never through a symbolic link that leaves `allowed_root` (default: `src`;
    a hub snapshot passes its cache repo, whose snapshot files link to ../../blobs).

    On filesystems that support it the kernel clones the data (copy_file_range reflinks on XFS/btrfs),
    so large weights cost neither time nor space there. `weights=False` copies everything else.
    """
    from posttrain.core.errors import UserError

    root = (allowed_root or src).resolve()
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts):
            continue  # hub snapshot internals (.cache, .gitattributes) are not part of the model
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError) as exc:  # a dangling link or a link loop
            raise UserError(f"{path}: broken or looping symbolic link in the model folder ({exc})") from None
        if real != root and root not in real.parents:
            raise UserError(f"{path}: symbolic link to {real}, outside the model folder {root}; "
                            "copy that file into the folder instead")
        if real.is_dir() or path.suffix in (".bin", ".pt", ".pth", ".pkl"):
            continue  # pickles never enter the registry
        if not weights and path.suffix in WEIGHT_SUFFIXES:
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_file(real, target)


def copy_file(src: Path, dst: Path) -> None:
    """Copy bytes (reflinked where the filesystem can), never linking."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        copied = 0
        try:
            while copied < size:
                step = os.copy_file_range(fin.fileno(), fout.fileno(), size - copied)
                if step == 0:
                    break
                copied += step
        except OSError:
            copied = -1  # not supported between these filesystems: plain copy below
        if copied != size:
            fin.seek(0)
            fout.seek(0)
            fout.truncate()
            shutil.copyfileobj(fin, fout, 16 * 1024 * 1024)
    shutil.copystat(src, dst)
