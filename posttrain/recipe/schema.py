"""The recipe JSON schema, with each stage kind's config as an alternative under `stages`."""
from __future__ import annotations

from typing import Any

from posttrain.recipe.model import Recipe
from posttrain.kinds import get_stage, known_kinds


def recipe_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema()
    defs = schema.setdefault("$defs", {})
    alternatives = []
    for kind in known_kinds():
        if kind == "model":
            continue
        config_schema = get_stage(kind).Config.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(config_schema.pop("$defs", {}))
        name = f"stage_{kind}"
        defs[name] = config_schema
        alternatives.append({"$ref": f"#/$defs/{name}"})
    schema["properties"]["stages"]["additionalProperties"] = {"oneOf": alternatives} if alternatives else {}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "posttrain recipe"
    return schema
