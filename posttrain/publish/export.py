"""`posttrain export REF DIR`: a model entry as a folder that loads anywhere a Hub model folder does.

The folder holds the weights (safetensors, in the entry's storage dtype unless asked otherwise), the
config, the generation config, the tokenizer with its chat template, and a model card that says what
made the model: its lineage back to the base, the resolved configuration of every stage on the way,
training metrics, every evaluation the registry holds for it, and the decontamination summary of the
data it was trained on. `posttrain_lineage.json` carries the same facts for machines.

Nothing in the registry is shared with the export (files are copied, never linked), and the folder
appears whole or not at all (written beside the target, then renamed).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.core.errors import UserError
from posttrain.registry import Registry, short

# Registry bookkeeping that has no place in a Hub folder (the card and lineage file replace it).
LEFT_OUT = {"manifest.json", "posttrain.log", "README.md"}
LEFT_OUT_DIRS = {"tensorboard", "adapter"}
DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class Exported:
    folder: Path
    key: str
    files: list[str]
    dtype: str | None
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)


def export_model(registry: Registry, ref_or_key: str, target: Path, dtype: str | None = None,
                 force: bool = False) -> Exported:
    """Write the model entry `ref_or_key` as a Hub-style folder at `target` (see the module doc)."""
    key = registry.resolve(ref_or_key)
    entry = registry.get(key)
    if entry is None:
        raise UserError(f"entry {short(key)} is not in {registry.root} (or is corrupt: run `posttrain verify`)")
    if not (entry.path / "config.json").is_file() or not any(entry.path.glob("*.safetensors")):
        raise UserError(f"{ref_or_key} is {'an' if entry.kind[0] in 'aeiou' else 'a'} {entry.kind} entry, not a model: export takes a stage that "
                        "produces a model (sft, dpo, distill, merge, model)")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    target = target.expanduser().resolve()
    if target == registry.root or registry.root in target.parents:
        raise UserError(f"{target} is inside the registry {registry.root}: export to a folder of your own")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        if not force:
            raise UserError(f"{target} exists and is not empty: choose another folder, or pass --force to "
                            "replace it")
    staging = target.parent / f".{target.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.mkdir()
        files = _copy_model_files(entry.path, staging)
        stored = _weights_dtype(staging)
        if dtype is not None and dtype != stored:
            _cast_weights(staging, dtype)
            stored = dtype
        facts = lineage_facts(registry, key)
        (staging / "posttrain_lineage.json").write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
        (staging / "README.md").write_text(model_card(facts, stored))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Exported(target, key, sorted(files + ["README.md", "posttrain_lineage.json"]), stored,
                    facts["evaluations"])


def _copy_model_files(source: Path, staging: Path) -> list[str]:
    """Copy the entry's model files (bytes, never links), writable by the user."""
    copied = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if path.is_dir() or rel.parts[0] in LEFT_OUT_DIRS or str(rel) in LEFT_OUT or path.is_symlink():
            continue
        destination = staging / rel
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
        destination.chmod(0o644)
        copied.append(str(rel))
    return copied


def _weights_dtype(folder: Path) -> str | None:
    """The dtype of the floating-point tensors in the folder's safetensors files (None if mixed)."""
    from safetensors import safe_open

    found = set()
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            for name in handle.keys():
                dtype = handle.get_slice(name).get_dtype()
                if dtype in ("BF16", "F16", "F32", "F64"):
                    found.add({"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}[dtype])
    return found.pop() if len(found) == 1 else None


def _cast_weights(folder: Path, dtype: str) -> None:
    """Cast every floating-point tensor to `dtype`, shard by shard (one shard in memory at a time),
    and say so in config.json."""
    import torch
    from safetensors.torch import load_file, save_file

    target = getattr(torch, dtype)
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = {name: t.to(target) if t.is_floating_point() else t for name, t in load_file(str(shard)).items()}
        save_file(tensors, str(shard), metadata={"format": "pt"})
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    for name in ("dtype", "torch_dtype"):
        config[name] = dtype
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # total_size counts bytes, which the cast changed
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = sum(
            _tensor_bytes(shard) for shard in folder.glob("*.safetensors"))
        index.write_text(json.dumps(data, indent=2) + "\n")


def _tensor_bytes(shard: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(shard), "pt") as handle:
        return sum(handle.get_tensor(name).nbytes for name in handle.keys())


def lineage_facts(registry: Registry, key: str) -> dict[str, Any]:
    """What made the entry, as plain data: every stage of its lineage with config and metrics (build
    order), the evaluations of it in the registry, and the decontamination of its training data."""
    top = registry.get(key)
    manifest = top.manifest
    stages = []
    for entry in sorted(filter(None, map(registry.get, registry.lineage(key))),
                        key=lambda e: e.manifest.get("timings", {}).get("finished", 0)):
        m = entry.manifest
        stages.append({
            "stage": m.get("stage"), "kind": entry.kind, "key": entry.key,
            "inputs": {path: {"stage": m.get("input_names", {}).get(path), "key": k}
                       for path, k in m.get("inputs", {}).items()},
            "config": m.get("config", {}),
            "metrics": {k: v for k, v in m.get("metrics", {}).items() if isinstance(v, (int, float, str))},
            "selections": {path: {k: s.get(k) for k in ("of", "by", "mode", "chosen", "score")}
                           for path, s in (m.get("selections") or {}).items()},
        })
    decontamination = {}
    for stage in stages:
        if stage["kind"] != "prepare_data":
            continue
        found = registry.get(stage["key"]).manifest.get("metrics", {}).get("decontamination")
        if found:
            decontamination[stage["stage"]] = {k: found.get(k) for k in (
                "policy", "checked", "contaminated", "evaluation_items", "by_task", "generic_questions")}
    base = next((s for s in stages if s["kind"] == "model"), None)
    return {
        "model": {"ref": manifest.get("ref"), "stage": manifest.get("stage"), "kind": top.kind, "key": key,
                  "recipe": manifest.get("recipe"), "profile": manifest.get("profile")},
        "base_model": (base or {}).get("config", {}).get("model"),
        "stages": stages,
        "evaluations": evaluations_of(registry, key),
        "decontamination": decontamination,
        "versions": manifest.get("versions", {}),
    }


def evaluations_of(registry: Registry, key: str) -> dict[str, dict[str, Any]]:
    """Every eval entry's results for the model `key`: {eval stage: {metric: {value, stderr}}}."""
    found = {}
    for other in registry.keys():
        entry = registry.get(other)
        if entry is None or entry.kind != "eval":
            continue
        metrics = entry.manifest.get("metrics", {})
        for name, model_key in (metrics.get("models") or {}).items():
            if model_key == key and name in (metrics.get("results") or {}):
                found[f"{entry.manifest.get('stage')} ({short(other)})"] = metrics["results"][name]
    return found


def model_card(facts: dict[str, Any], dtype: str | None) -> str:
    """README.md with Hub metadata: what the model is, how it was made, how it scored."""
    model = facts["model"]
    kinds = sorted({s["kind"] for s in facts["stages"] if s["kind"] not in ("model", "prepare_data")})
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             f"tags: [{', '.join(['posttrain', *kinds])}]"]
    if facts["base_model"] and not str(facts["base_model"]).startswith((".", "/", "~")):
        front.append(f"base_model: {facts['base_model']}")  # a hub id, not a local folder
    lines = front + ["---", f"# {model['recipe']} / {model['stage']}", "",
                     f"Post-trained with posttrain from recipe `{model['recipe']}`"
                     + (f" (profile `{model['profile']}`)" if model.get("profile") else "")
                     + f"; registry key `{model['key']}`. Weights: safetensors, {dtype or 'mixed dtypes'}.", ""]
    lines += ["## Lineage", "", "Stages in the order they were built (inputs in brackets):", ""]
    for stage in facts["stages"]:
        inputs = ", ".join(sorted({i["stage"] or "?" for i in stage["inputs"].values()}))
        lines.append(f"- **{stage['stage']}** ({stage['kind']}, `{short(stage['key'])}`)"
                     + (f" ← {inputs}" if inputs else "")
                     + (f" — {stage['config'].get('model')}" if stage["kind"] == "model" else ""))
        for path, chosen in stage["selections"].items():
            lines.append(f"  - `{path}`: {chosen['chosen']} chosen from {chosen['of']} by {chosen['by']} "
                         f"({chosen['mode']}, {chosen['score']:.4g})" if isinstance(chosen.get("score"), (int, float))
                         else f"  - `{path}`: {chosen.get('chosen')} chosen from {chosen.get('of')}")
    if facts["evaluations"]:
        lines += ["", "## Evaluation", "", "| evaluation | metric | value | stderr |", "| --- | --- | --- | --- |"]
        for where, results in sorted(facts["evaluations"].items()):
            for metric, result in sorted(results.items()):
                stderr = result.get("stderr")
                lines.append(f"| {where} | {metric} | {result.get('value'):.4g} | "
                             f"{'-' if stderr is None else f'{stderr:.3g}'} |")
    training = [(s["stage"], k, v) for s in facts["stages"] if s["kind"] in ("sft", "dpo", "distill", "merge")
                for k, v in s["metrics"].items() if k in ("final_train_loss", "final_eval_loss", "steps",
                                                           "train_seconds", "tokens")]
    if training:
        lines += ["", "## Training", "", "| stage | metric | value |", "| --- | --- | --- |"]
        lines += [f"| {stage} | {k} | {v:.4g} |" if isinstance(v, float) else f"| {stage} | {k} | {v} |"
                  for stage, k, v in training]
    lines += ["", "## Training data decontamination", ""]
    if facts["decontamination"]:
        lines += ["| data | policy | rows checked | contaminated | evaluation items | by task |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, found in sorted(facts["decontamination"].items()):
            by_task = ", ".join(f"{t}: {n}" for t, n in sorted((found.get("by_task") or {}).items())) or "-"
            lines.append(f"| {name} | {found.get('policy')} | {found.get('checked')} | {found.get('contaminated')} "
                         f"| {found.get('evaluation_items')} | {by_task} |")
    else:
        lines.append("The training data was not checked against evaluation sets (no `decontaminate:` in the recipe).")
    lines += ["", "## Recipe", "", "The resolved configuration of every stage above (what the recipe said, with "
              "defaults filled in):", "", "```yaml", _recipe_yaml(facts), "```", ""]
    versions = facts.get("versions") or {}
    if versions:
        lines += ["## Software", "", ", ".join(f"{k} {v}" for k, v in sorted(versions.items())), ""]
    return "\n".join(lines)


def _recipe_yaml(facts: dict[str, Any]) -> str:
    import yaml

    stages = {s["stage"]: {k: v for k, v in s["config"].items() if v is not None and k != "description"}
              for s in facts["stages"]}
    return yaml.safe_dump({"stages": stages}, sort_keys=False, default_flow_style=False).rstrip()
