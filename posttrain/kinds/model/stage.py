"""`kind: model`: a starting model (the recipe's `base`, or an entry of `models:`) as a registry entry.

A local folder is fingerprinted by content; a hub id is downloaded once and its resolved commit is
recorded. The recipe's chat template is attached here, so every later stage inherits the same template
and end-of-turn EOS.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from posttrain.core.errors import UserError
from posttrain.hf.model_folder import copy_model_folder, missing_parts
from posttrain.core.strict import ModelSpec
from posttrain.kinds.base import Stage, StageConfig, StageContext
from posttrain.hf.weights import stored_dtype
from posttrain.core.context import in_recipe

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]


class ModelConfig(StageConfig, ModelSpec):
    kind: Literal["model"] = "model"


def looks_local(value: str, recipe_dir: Path) -> bool:
    """A value is a local path if it exists, or is written like one; otherwise it is a hub id."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = recipe_dir / path
    return path.exists() or value.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(value)


class ModelStage(Stage):
    kind = "model"
    version = "1"
    Config = ModelConfig
    produces = "model"

    def local_files(self, config: ModelConfig) -> dict[str, str]:
        files = {}
        # Fingerprinting recipe_dir-relative paths is the runner's job; we only say which fields are paths.
        for field in ("model", "tokenizer"):
            value = getattr(config, field)
            if value and not _HUB_ID.match(value):
                files[field] = value
        if config.chat_template and config.chat_template.endswith((".jinja", ".jinja2", ".j2")):
            files["chat_template"] = config.chat_template
        return files

    def validate(self, config: ModelConfig, recipe_dir: Path) -> list[tuple[str, str]]:
        problems = []
        for field in ("model", "tokenizer"):
            value = getattr(config, field)
            if not value or not looks_local(value, recipe_dir):
                continue
            folder = in_recipe(value, recipe_dir)
            if not folder.is_dir():
                problems.append((field, f"folder not found: {folder}"))
                continue
            need_tokenizer = field == "tokenizer" or config.tokenizer is None
            if field == "model":
                lacking = missing_parts(folder, need_tokenizer=need_tokenizer)
            else:
                lacking = [m for m in missing_parts(folder) if m.startswith("tokenizer")]
            if lacking:
                problems.append((field, f"{folder} is not a usable model folder; missing: " + "; ".join(lacking)))
        from posttrain.hf.chat_templates import end_of_turn_problems, template_problems

        problems += template_problems(config.chat_template, recipe_dir)
        tokenizer_value = config.tokenizer or config.model
        if looks_local(tokenizer_value, recipe_dir) and not problems:
            problems += end_of_turn_problems(config.chat_template, recipe_dir, in_recipe(tokenizer_value, recipe_dir))
        return problems

    def run(self, config: ModelConfig, ctx: StageContext) -> dict[str, Any]:
        info: dict[str, Any] = {"model": config.model}
        source = self._fetch(config.model, config.revision, ctx, info)
        lacking = missing_parts(source, need_tokenizer=config.tokenizer is None)
        if lacking:
            raise UserError(f"{source} is not a usable model folder; missing: " + "; ".join(lacking))
        stored = stored_dtype(source)
        convert = config.dtype != "auto" and stored != config.dtype
        info["dtype"] = config.dtype if config.dtype != "auto" else stored
        if ctx.is_main:
            copy_model_folder(source, ctx.out_dir, allowed_root=_links_may_reach(source, info), weights=not convert)
            if convert:
                _store_weights_as(source, ctx.out_dir, config.dtype, config.trust_remote_code)
        tokenizer_source = source
        if config.tokenizer:
            tokenizer_source = self._fetch(config.tokenizer, None, ctx, {})
        self._write_tokenizer(config, tokenizer_source, ctx, info)
        return info

    def _fetch(self, value: str, revision: str | None, ctx: StageContext, info: dict) -> Path:
        if looks_local(value, ctx.recipe_dir):
            folder = ctx.resolve(value)
            if not folder.is_dir():
                raise UserError(f"model folder not found: {folder}")
            info["source"] = "local"
            return folder
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            folder = Path(snapshot_download(value, revision=revision, allow_patterns=_WEIGHT_PATTERNS))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
            raise UserError(f"could not download {value!r} (revision {revision or 'main'}) from the hub: {exc}") from exc
        info["source"] = "hub"
        info["resolved_revision"] = folder.name  # snapshot folders are named by commit hash
        return folder

    def _write_tokenizer(self, config: ModelConfig, source: Path, ctx: StageContext, info: dict) -> None:
        from posttrain.hf.tokenizer_setup import attach_chat_template

        template = attach_chat_template(
            source, ctx.out_dir, config.chat_template, ctx.recipe_dir, trust_remote_code=config.trust_remote_code,
            write=ctx.is_main,
        )
        if template is not None:
            info["chat_template"] = template.name
            info["eos_token"] = template.end_of_turn


def _links_may_reach(source: Path, info: dict) -> Path:
    """A hub snapshot's files are links into its cache repo's blobs/; a local folder's stay inside it."""
    return source.parent.parent if info.get("source") == "hub" else source


def _store_weights_as(source: Path, out_dir: Path, dtype: str, trust_remote_code: bool) -> None:
    """base.dtype differs from how the folder stores its weights: convert them once, here."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=getattr(torch, dtype),
                                                 trust_remote_code=trust_remote_code)
    for old in out_dir.glob("*.safetensors*"):
        old.unlink()
    model.save_pretrained(str(out_dir), safe_serialization=True)
