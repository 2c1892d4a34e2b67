"""The quick verbs must not import heavy libraries: that is what keeps them under 2 s (see bench/)."""
from __future__ import annotations

import pytest

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


@pytest.mark.slow
def test_quick_verbs_import_no_heavy_library(tmp_path, registry_dir):
    recipe = two_stage_recipe(tmp_path)
    posttrain.run(recipe)
    for args in (["validate", str(recipe)], ["plan", str(recipe)], ["ls"], ["run", str(recipe)],
                 ["show", "pair/two"], ["schema"]):
        assert heavy_modules(*args) == [], args


@pytest.mark.slow
def test_help_and_schema(tmp_path):
    help_out = cli("--help")
    for verb in ("run", "plan", "validate", "ls", "show", "verify", "gc", "schema"):
        assert verb in help_out.stdout
    schema = json.loads(cli("schema").stdout)
    stage_kinds = schema["properties"]["stages"]["additionalProperties"]["oneOf"]
    assert {"$ref": "#/$defs/stage_count"} in stage_kinds
    assert schema["$defs"]["stage_count"]["additionalProperties"] is False


@pytest.mark.slow
def test_a_run_prints_one_line_per_stage_and_keeps_library_output_in_the_stage_logs(tmp_path):
    """On a non-terminal: stage lines, a closing table and gates; tqdm bars and trainer dicts go to logs."""
    import subprocess
    import sys

    from conftest import ROOT

    registry = tmp_path / "registry"
    result = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(ROOT / "recipes" / "quickstart.yaml"),
                             "stages.sft.training.max_steps=10", "stages.dpo.training.max_steps=4",
                             "--registry", str(registry)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    assert not any("it/s" in line or "{'loss'" in line for line in lines)
    # base, sft.data, sft, dpo.data, dpo: prepared data is a step of its own
    assert sum("done" in line for line in lines) == 5 and "stage  " in result.stdout  # closing table header
    logs = "".join(p.read_text(errors="replace") for p in registry.glob("entries/*/posttrain.log"))
    assert "'loss'" in logs  # the trainer's own output is kept, in the stage's log
