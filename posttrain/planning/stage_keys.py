"""Compute every stage's registry key from the recipe alone (no stage has to run to know its key)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from posttrain.registry.code_fingerprint import code_files, code_fingerprint
from posttrain.registry.file_fingerprint import FingerprintCache, fingerprint
from posttrain.recipe.load import LoadedRecipe
from posttrain.recipe.selection import Selection
from posttrain.registry import entry_key
from posttrain.core.context import in_recipe


@dataclass(frozen=True)
class StageKey:
    name: str
    key: str
    material: dict[str, Any]


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = data
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        elif part in node:
            node = node[part]
        else:
            return  # an input that is no config field (an eval's prepared data per model)
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _drop_path(data: dict, dotted: str) -> None:
    """Remove a dotted key from a config dump if it is there."""
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


# Trainer settings that change how fast a stage trains, not what it learns: left out of every stage's key
# (beside each kind's own `operational_keys`), so switching flash-attention, torch.compile or Liger on for a
# rerun reuses the finished entries; the manifest records them under "operational". They compute the
# same functions, up to floating-point rounding order.
SPEED_SETTINGS = ("attn_implementation", "training.torch_compile", "training.torch_compile_backend", "training.torch_compile_mode",
                  "training.use_liger_kernel", "training.liger_kernel_config", "training.dataloader_pin_memory",
                  "training.dataloader_persistent_workers", "training.dataloader_prefetch_factor")


def _find_path(data: dict, dotted: str) -> tuple[bool, Any]:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def operational_paths(stage: Any) -> tuple[str, ...]:
    """Dotted config paths left out of a stage's key: its kind's operational settings and SPEED_SETTINGS."""
    return tuple(getattr(stage, "operational_keys", ())) + SPEED_SETTINGS


def operational_settings(stage: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The operational settings a stage's config sets (dotted path -> value), for its manifest."""
    found = {}
    for dotted in operational_paths(stage):
        present, value = _find_path(config, dotted)
        if present:
            found[dotted] = value
    return found


Chooser = Callable[[str, dict[str, "StageKey"]], Optional[str]]


def compute_keys(loaded: LoadedRecipe, cache: FingerprintCache, choose: Chooser | None = None) -> dict[str, StageKey]:
    """Every stage's key. A `select` step takes the key of the candidate `choose(step, keys)` names;
    while that is unknown (its eval has not run), it and everything that depends on it have no key yet."""
    keys: dict[str, StageKey] = {}
    for name in loaded.order:
        item = loaded.stages[name]
        if any(ref not in keys for ref in item.inputs.values()):
            continue  # waits on a selection
        if isinstance(item.stage, Selection):
            chosen = choose(name, keys) if choose else None
            if chosen is not None:
                keys[name] = StageKey(name, keys[chosen].key, {**keys[chosen].material, "selected": chosen})
            continue
        config = item.config.model_dump(mode="json", exclude={"description"})
        config.pop("seed", None)
        for dotted in operational_paths(item.stage):
            _drop_path(config, dotted)
        # Inputs enter the key by their entry keys, not their names: renaming a stage reuses its work.
        for path in item.inputs:
            _set_path(config, path, "<input>")
        inputs = {path: keys[ref].key for path, ref in item.inputs.items()}
        if item.kind == "prepare_data":
            # Its model input is where the tokenizer was last set (the loader follows it back), and
            # only the tokenizer counts: the name "tokenizer" keeps keys apart from a model input's.
            inputs = {"tokenizer": keys[item.inputs["model"]].key}
        data = {}
        for path, value in item.stage.local_files(item.config).items():
            local = in_recipe(value, loaded.dir)
            data[path] = fingerprint(local, cache) if local.exists() else "missing"
        seed = item.config.seed if item.config.seed is not None else loaded.recipe.seed
        material = {
            "kind": item.kind,
            "version": item.stage.version,
            "code": code_fingerprint(type(item.stage).__module__),
            "code_files": code_files(type(item.stage).__module__),  # which files, to say which changed
            "config": config,
            "inputs": inputs,
            "data": data,
            "seed": seed,
        }
        # `code_files` names the files by path to explain a rebuild; the key takes only `code`, so
        # moving a module to another folder keeps every key (code_fingerprint's policy).
        keyed = {part: value for part, value in material.items() if part != "code_files"}
        keys[name] = StageKey(name, entry_key(keyed), material)
    cache.save()
    return keys


def explain_change(old: dict[str, Any], new: dict[str, Any], key_names: dict[str, str]) -> str:
    """Why a stage's key differs from the one its ref pointed at, in words."""
    reasons = []
    if old.get("version") != new.get("version"):
        reasons.append(f"stage code version {old.get('version')} -> {new.get('version')}")
    if old.get("code") != new.get("code"):
        before, after = old.get("code_files") or {}, new.get("code_files") or {}
        changed = sorted(f for f in set(before) | set(after) if before.get(f) != after.get(f))
        reasons.append(f"the stage's code changed ({', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''})"
                       if before and changed else "the stage's code changed")
    if old.get("kind") != new.get("kind"):
        reasons.append(f"kind {old.get('kind')} -> {new.get('kind')}")
    for path in sorted(set(old.get("inputs", {})) | set(new.get("inputs", {}))):
        a, b = old.get("inputs", {}).get(path), new.get("inputs", {}).get(path)
        if a != b:
            reasons.append(f"input {path} ({key_names.get(b, '?')}) changed")
    for path in sorted(set(old.get("data", {})) | set(new.get("data", {}))):
        if old.get("data", {}).get(path) != new.get("data", {}).get(path):
            reasons.append(f"contents of {path} changed")
    for path, (a, b) in _diff(old.get("config", {}), new.get("config", {})).items():
        reasons.append(f"{path}: {a!r} -> {b!r}")
    if old.get("seed") != new.get("seed"):
        reasons.append(f"seed {old.get('seed')} -> {new.get('seed')}")
    if not reasons:
        return "settings changed"
    more = f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else ""
    return "; ".join(reasons[:3]) + more


_MISSING = "<unset>"


def _diff(a: Any, b: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(a) | set(b), key=str):
            out.update(_diff(a.get(key, _MISSING), b.get(key, _MISSING), f"{prefix}{key}."))
        return out
    return {} if a == b else {prefix.rstrip("."): (a, b)}
