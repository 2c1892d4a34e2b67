"""Nothing partial is ever visible; kills resume; concurrent runs build each entry once; damage is found."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import posttrain
from conftest import cli, count_runs, two_stage_recipe
from posttrain.core.errors import UserError
from posttrain.registry import Registry
from posttrain.registry.paths import safe_child


def _visible(registry_dir):
    """What ls / show / verify report, as a user would see it."""
    ls = cli("ls", "--registry", str(registry_dir))
    verify = cli("verify", "--registry", str(registry_dir))
    return ls, verify


@pytest.mark.slow
def test_sigkill_mid_stage_leaves_nothing_partial_and_rerun_resumes(tmp_path, registry_dir):
    recipe = two_stage_recipe(tmp_path, one_steps=40, sleep=0.1)
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(recipe)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    progress = None
    while time.time() < deadline:
        found = list((registry_dir / "work").glob("*/progress.json")) if (registry_dir / "work").exists() else []
        if found and json.loads(found[0].read_text())["done"] >= 5:
            progress = found[0]
            break
        time.sleep(0.05)
    assert progress is not None, proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    registry = Registry(registry_dir)
    assert [registry.load(k).kind for k in registry.keys()] == ["model"]  # only the finished base
    ls, verify = _visible(registry_dir)
    assert "count" not in ls.stdout and verify.returncode == 0 and "1 ok" in verify.stdout

    result = posttrain.run(recipe)
    assert result.ran == ["one", "two"]
    assert result.metrics("one")["resumed_from"] >= 5
    assert json.loads((result.path("one") / "result.json").read_text())["count"] == 40
    assert not any((registry_dir / "tmp").iterdir())
    assert cli("verify", "--registry", str(registry_dir)).returncode == 0


@pytest.mark.slow
def test_sigterm_stops_cleanly_with_a_resume_command(tmp_path, registry_dir):
    recipe = two_stage_recipe(tmp_path, one_steps=200, sleep=0.05)
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(recipe)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(registry_dir.glob("work/*/progress.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert f"posttrain run {recipe}" in err
    assert len(Registry(registry_dir).keys()) == 1  # base only; the interrupted stage left no entry


@pytest.mark.slow
def test_two_processes_build_each_entry_once(tmp_path, registry_dir):
    recipe = two_stage_recipe(tmp_path, one_steps=10, sleep=0.05)
    procs = [subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(recipe)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    runs = count_runs(registry_dir)
    assert sorted(line.split()[0] for line in runs) == ["one", "two"], runs
    registry = Registry(registry_dir)
    assert len(registry.keys()) == 3
    assert set(registry.refs()) == {"pair/base", "pair/one", "pair/two"}
    assert cli("verify", "--registry", str(registry_dir)).returncode == 0


@pytest.mark.parametrize("damage", ["remove", "truncate"])
@pytest.mark.slow
def test_damaged_entry_is_named_by_verify_and_rebuilt(tmp_path, registry_dir, damage):
    recipe = two_stage_recipe(tmp_path)
    first = posttrain.run(recipe)
    target = first.path("one") / "result.json"
    if damage == "remove":
        target.unlink()
    else:
        target.write_text(target.read_text()[:5])
    verify = cli("verify", "--registry", str(registry_dir))
    assert verify.returncode == 1
    assert f"CORRUPT {first.entries['one'].key[:12]}" in verify.stdout and "result.json" in verify.stdout
    second = posttrain.run(recipe)
    assert second.ran == ["one"]
    assert json.loads((second.path("one") / "result.json").read_text())["count"] == 2
    assert cli("verify", "--registry", str(registry_dir)).returncode == 0


def test_same_size_corruption_is_caught_by_verify(tmp_path, registry_dir):
    first = posttrain.run(two_stage_recipe(tmp_path))
    target = first.path("two") / "result.json"
    text = target.read_text()
    target.write_text(text.replace('"x"', '"y"'))
    verify = cli("verify", "--registry", str(registry_dir), "pair/two")
    assert verify.returncode == 1 and "was changed after it was committed" in verify.stdout
    assert "set aside" in verify.stdout and not first.path("two").exists()  # no run can use it any more


def test_names_cannot_escape_the_registry(tmp_path):
    registry = Registry(tmp_path / "reg")
    for bad in ("../evil", "a/../../b", "/abs/path", "..", ".hidden/x"):
        with pytest.raises(UserError):
            registry.set_ref(bad if "/" in bad else f"{bad}/x", "0" * 64)
    with pytest.raises(UserError):
        registry.entry_dir("../" + "0" * 61)
    with pytest.raises(UserError):
        safe_child(tmp_path, "..")
    assert not (tmp_path / "evil").exists()


@pytest.mark.slow
def test_gc_is_a_dry_run_unless_told(tmp_path, registry_dir):
    recipe = two_stage_recipe(tmp_path)
    posttrain.run(recipe)
    posttrain.run(recipe, overrides=["stages.two.steps=9"])  # the old `two` entry is now unreferenced
    registry = Registry(registry_dir)
    assert len(registry.keys()) == 4
    dry = cli("gc", "--registry", str(registry_dir))
    assert "would remove entries/" in dry.stdout and len(registry.keys()) == 4
    cli("gc", "--registry", str(registry_dir), "--yes")
    assert len(registry.keys()) == 3
    assert posttrain.run(recipe, overrides=["stages.two.steps=9"]).ran == []


@pytest.mark.slow
def test_show_prints_lineage_back_to_the_base(tmp_path, registry_dir):
    posttrain.run(two_stage_recipe(tmp_path))
    show = cli("show", "--registry", str(registry_dir), "pair/two")
    assert show.returncode == 0
    lines = show.stdout.splitlines()
    lineage = lines[lines.index("lineage") + 1: lines.index("config")]
    assert [line.strip().split()[1] for line in lineage] == ["two", "model", "model"]
    assert "one (count" in lineage[1] and "base (model" in lineage[2]
    missing = cli("show", "--registry", str(registry_dir), "pair/nope")
    assert missing.returncode == 2 and "no ref 'pair/nope'" in missing.stderr


@pytest.mark.slow
def test_a_failing_stage_names_itself_and_the_resume_command(tmp_path, registry_dir):
    recipe = two_stage_recipe(tmp_path)
    os.environ["COUNT_FAIL"] = "1"
    recipe.write_text(recipe.read_text().replace("steps: 3", "steps: 3\n    label: boom"))
    result = cli("run", str(recipe))
    del os.environ["COUNT_FAIL"]
    assert result.returncode == 1
    assert "stage 'two' (count) failed: RuntimeError: label boom asked to fail" in result.stderr
    assert f"resume with: posttrain run {recipe}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any((registry_dir / "tmp").iterdir())  # nothing half-written left behind
    assert len(Registry(registry_dir).keys()) == 2
