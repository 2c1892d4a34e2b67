"""The quick verbs must not import heavy libraries: that is what keeps them under 2 s (see bench/)."""
from __future__ import annotations

import json
import subprocess
import sys

import posttrain
from conftest import cli, two_stage_recipe

PROBE = """
import sys, json
from posttrain.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "transformers", "trl", "datasets", "peft") if m in sys.modules)
print("HEAVY=" + json.dumps(heavy))
sys.exit(code)
"""


def heavy_modules(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.rsplit("HEAVY=", 1)[1])


def test_quick_verbs_import_no_heavy_library(tmp_path, registry_dir):
    recipe = two_stage_recipe(tmp_path)
    posttrain.run(recipe)
    for args in (["validate", str(recipe)], ["plan", str(recipe)], ["ls"], ["run", str(recipe)],
                 ["show", "pair/two"], ["schema"]):
        assert heavy_modules(*args) == [], args


def test_help_and_schema(tmp_path):
    help_out = cli("--help")
    for verb in ("run", "plan", "validate", "ls", "show", "verify", "gc", "schema"):
        assert verb in help_out.stdout
    schema = json.loads(cli("schema").stdout)
    stage_kinds = schema["properties"]["stages"]["additionalProperties"]["oneOf"]
    assert {"$ref": "#/$defs/stage_count"} in stage_kinds
    assert schema["$defs"]["stage_count"]["additionalProperties"] is False
