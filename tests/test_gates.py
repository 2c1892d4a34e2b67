"""Quality gates: checked after a run; a failing gate fails the command with exit code 3."""
from __future__ import annotations

import pytest

from conftest import cli, two_stage_recipe
from posttrain.cli import main


@pytest.mark.slow
def test_passing_and_failing_gates(tmp_path):
    recipe = two_stage_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + """gates:
  - {name: enough steps, metric: two/steps, above: one/steps}
  - {name: impossible, metric: one/steps, above: 100}
""")
    result = cli("run", str(recipe))
    assert result.returncode == 3
    assert "gate PASS  enough steps: two/steps = 3 > 2" in result.stdout
    assert "gate FAIL  impossible: one/steps = 2 > 100" in result.stdout
    assert "1 quality gate(s) failed: impossible" in result.stderr


def test_gate_on_an_unknown_stage_is_a_validation_error(tmp_path, capsys):
    recipe = two_stage_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + "gates:\n  - {name: g, metric: nope/loss, below: 1}\n")
    assert main(["validate", str(recipe)]) == 2
    assert "gates.0: gate 'g' reads stage 'nope', which is not in the recipe" in capsys.readouterr().err


def test_the_python_api_checks_gates_and_returns_their_results(tmp_path):
    import posttrain

    recipe = two_stage_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + """gates:
  - {name: enough steps, metric: two/steps, above: one/steps}
  - {name: impossible, metric: one/steps, above: 100}
""")
    result = posttrain.run(recipe)
    assert [(g.name, g.passed) for g in result.gates] == [("enough steps", True), ("impossible", False)]
    assert not result.gates_passed
