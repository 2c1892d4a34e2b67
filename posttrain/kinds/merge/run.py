"""The merge stage's body: our config -> mergekit's MergeConfiguration -> run_merge -> HF folder."""
from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.core.errors import UserError
from posttrain.core.context import StageContext

if TYPE_CHECKING:  # the config class, for the signature only (the stage module imports this one)
    from posttrain.kinds.merge.stage import MergeConfig

# mergekit's options we set ourselves (determinism, offline safety, our own tokenizer/card handling).
_OWN_OPTIONS = {"random_seed", "copy_tokenizer", "write_model_card", "safe_serialization", "trust_remote_code"}
DONOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "chat_template.jinja", "generation_config.json")


def mergekit_dict(config: MergeConfig, paths: dict[str, str]) -> dict[str, Any]:
    """Our stage config as mergekit's YAML-shaped dict; `paths` maps each input's config path to a model path."""
    base_key = "base_model"
    out: dict[str, Any] = {
        "merge_method": config.method,
        "base_model": paths[base_key],
        "models": [{"model": paths[f"models.{i}.model"], **({"parameters": m.parameters} if m.parameters else {})}
                   for i, m in enumerate(config.models)],
    }
    if config.parameters:
        out["parameters"] = config.parameters
    for field in ("dtype", "out_dtype"):
        if getattr(config, field):
            out[field] = getattr(config, field)
    out["tokenizer_source"] = config.tokenizer_source
    return out


def check_merge_config(config: MergeConfig) -> list[tuple[str, str]]:
    """Validate through mergekit itself; problems are mapped back to the recipe's keys."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import registry
    from mergekit.options import MergeOptions
    from pydantic import ValidationError

    problems: list[tuple[str, str]] = []
    names = sorted(m.spec.name for m in registry.registered_methods())
    if config.method not in names:
        return [("method", f"unknown merge method {config.method!r}; mergekit has: {', '.join(names)}")]
    spec = registry.get(config.method).spec
    known = {p.name: p for p in spec.parameters}
    for key in config.parameters:
        if key not in known:
            problems.append((f"parameters.{key}", f"{config.method} has no parameter {key!r} (it has: "
                                                  f"{', '.join(known) or 'none'})"))
    for i, item in enumerate(config.models):
        for key in item.parameters:
            if key not in known:
                problems.append((f"models.{i}.parameters.{key}", f"{config.method} has no parameter {key!r}"))
        for name, param in known.items():
            # mergekit gives e.g. ties' `weight` no default: say so now, not halfway through a merge.
            per_input = param.scope.value != "shared"
            if per_input and param.required and name not in item.parameters and name not in config.parameters:
                problems.append((f"models.{i}.parameters", f"{config.method} needs `{name}` for every model "
                                                           f"(here, or once under parameters:)"))
    for name, param in known.items():
        if param.scope.value == "shared" and param.required and name not in config.parameters:
            problems.append(("parameters", f"{config.method} needs `{name}` under parameters:"))
    placeholder = {"base_model": "base-model"} | {f"models.{i}.model": f"model-{i}" for i in range(len(config.models))}
    try:
        MergeConfiguration.model_validate(mergekit_dict(config, placeholder))
    except ValidationError as exc:
        for error in exc.errors():
            problems.append((_recipe_path(error["loc"]), error["msg"]))
    unknown_options = set(config.options) - set(MergeOptions.model_fields)
    for key in sorted(unknown_options):
        problems.append((f"options.{key}", "not a mergekit MergeOptions field"))
    for key in sorted(set(config.options) & _OWN_OPTIONS):
        problems.append((f"options.{key}", "set by posttrain (deterministic, offline merges)"))
    return problems


def _recipe_path(loc: tuple) -> str:
    mapping = {"merge_method": "method"}
    parts = [mapping.get(str(p), str(p)) for p in loc]
    return ".".join(parts)


def run_merge_stage(config: MergeConfig, ctx: StageContext) -> dict[str, Any]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    problems = check_merge_config(config)
    if problems:
        raise UserError("invalid merge: " + "; ".join(f"{k}: {m}" for k, m in problems))
    paths = {key: str(entry.path) for key, entry in ctx.inputs.items()}
    merge_config = MergeConfiguration.model_validate(mergekit_dict(config, paths))
    options = MergeOptions(**{**config.options, "random_seed": ctx.seed, "copy_tokenizer": False,
                              "write_model_card": False, "safe_serialization": True,
                              "quiet": config.options.get("quiet", False)})
    started = time.time()
    if ctx.is_main:
        run_merge(merge_config, str(ctx.out_dir), options)
        donor = ctx.inputs["base_model"].path
        _copy_donor_files(donor, ctx.out_dir)
    seconds = time.time() - started
    return {
        "method": config.method,
        "inputs": {key: entry.key for key, entry in ctx.inputs.items()},
        "donor": ctx.inputs["base_model"].key,
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "output_bytes": sum(p.stat().st_size for p in ctx.out_dir.glob("*.safetensors")),
        "mergekit_config": json.loads(json.dumps(mergekit_dict(config, {k: e.key for k, e in ctx.inputs.items()}))),
    }


def _copy_donor_files(donor: Path, out: Path) -> None:
    """Tokenizer, chat template and generation config from the donor (never mergekit's pick)."""
    for name in DONOR_FILES:
        if (donor / name).is_file():
            shutil.copy2(donor / name, out / name)
    for leftover in ("mergekit_config.yml", "README.md"):
        (out / leftover).unlink(missing_ok=True)  # ours come from the manifest and the model card
