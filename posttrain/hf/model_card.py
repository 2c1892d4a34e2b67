"""A model card (README.md) for every model entry: what it is, and the lineage back to the base."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posttrain.registry import Registry, short


def lineage_lines(registry: Registry, inputs: dict[str, str], names: dict[str, str], depth: int = 1) -> list[str]:
    lines, seen = [], set()
    for path, key in inputs.items():
        if key in seen:  # e.g. one prepared dataset behind every model an eval stage reads
            continue
        seen.add(key)
        entry = registry.get(key)
        kind = entry.kind if entry else "?"
        label = names.get(path, "?")
        detail = ""
        if entry and entry.kind == "model":
            detail = f" — {entry.manifest.get('config', {}).get('model', '')}"
        lines.append(f"{'  ' * depth}- `{path}` ← **{label}** ({kind}, `{short(key)}`){detail}")
        if entry:
            m = entry.manifest
            lines += lineage_lines(registry, m.get("inputs", {}), m.get("input_names", {}), depth + 1)
    return lines


def write_model_card(folder: Path, manifest: dict[str, Any], registry: Registry) -> None:
    metrics = {k: v for k, v in manifest.get("metrics", {}).items() if isinstance(v, (int, float, str))}
    lines = [
        "---",
        "library_name: transformers",
        "tags: [posttrain]",
        "---",
        f"# {manifest['recipe']} / {manifest['stage']}",
        "",
        f"Built by posttrain stage `{manifest['kind']}` from recipe `{manifest['recipe']}`"
        + (f" (profile `{manifest['profile']}`)" if manifest.get("profile") else "")
        + ".",
        "",
        "## Lineage",
        f"- **{manifest['stage']}** ({manifest['kind']})",
        *lineage_lines(registry, manifest.get("inputs", {}), manifest.get("input_names", {})),
        "",
        "## Configuration",
        "```json",
        json.dumps(manifest.get("config", {}), indent=2),
        "```",
    ]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
