"""Nothing lost, nothing wrongly reused: gc during a run, same-size corruption, shared bytes, signals,
a vanished rank 0, bad data files, task files that would run code, and code changes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import posttrain
from conftest import ROOT, TINY_MODEL, cli, two_stage_recipe, write_recipe
from posttrain.data.sources import DataConfig
from support.in_memory import load_conversations
from posttrain.core.errors import UserError
from posttrain.registry import CorruptEntry, Registry


def start_run(recipe: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


# -- 1. gc during a run -------------------------------------------------------------------------------

@pytest.mark.slow
def test_gc_during_a_run_leaves_the_running_build_alone(tmp_path, registry_dir):
    recipe = two_stage_recipe(tmp_path, one_steps=30, sleep=0.1)
    run = start_run(recipe)
    wait_for(lambda: list(registry_dir.glob("work/*/progress.json")))
    gc = cli("gc", "--yes", "--include-work", "--registry", str(registry_dir))
    assert gc.returncode == 0
    assert "tmp/" not in gc.stdout.replace("removed", "")  # neither the build folder...
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err[-2000:]  # ...nor the work folder of the running stage was taken
    verify = cli("verify", "--registry", str(registry_dir))
    assert verify.returncode == 0 and "0 corrupt" in verify.stdout


def test_gc_keeps_build_and_work_folders_whose_key_is_locked(tmp_path):
    registry = Registry(tmp_path / "reg")
    key = "a" * 64
    with registry.lock(key):
        tmp = registry.fresh_tmp_dir(key)
        work = registry.work_dir(key)
        work.mkdir(parents=True)
        assert registry.is_building(key)
        assert tmp not in registry.garbage(include_work=True) and work not in registry.garbage(include_work=True)
        assert not registry.remove(tmp) and tmp.exists()
    assert not registry.is_building(key)
    assert tmp in registry.garbage(include_work=True) and registry.remove(tmp) and not tmp.exists()


def test_a_commit_refuses_a_build_folder_that_vanished(tmp_path):
    registry = Registry(tmp_path / "reg")
    tmp = registry.fresh_tmp_dir("b" * 64)
    shutil.rmtree(tmp)
    with pytest.raises(CorruptEntry, match="gone or empty"):
        registry.commit("b" * 64, tmp, {"kind": "count"})
    assert registry.keys() == []


# -- 2. same-size corruption and empty manifests -------------------------------------------------------

def test_a_same_size_byte_flip_is_caught_before_reuse_and_rebuilt(tmp_path, registry_dir):
    recipe = two_stage_recipe(tmp_path)
    first = posttrain.run(recipe)
    target = first.path("one") / "result.json"
    assert not os.access(target, os.W_OK) or os.geteuid() == 0  # entries are written read-only
    assert target.stat().st_mode & 0o222 == 0
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x01  # one flipped bit, same size
    target.write_bytes(bytes(data))
    with pytest.raises(CorruptEntry, match="changed after it was committed"):
        Registry(registry_dir).load(first.entries["one"].key)
    again = posttrain.run(recipe)
    assert "one" in again.ran and json.loads((again.path("one") / "result.json").read_text())["count"] == 2


@pytest.mark.slow
def test_a_manifest_listing_no_files_is_never_accepted(tmp_path, registry_dir):
    first = posttrain.run(two_stage_recipe(tmp_path))
    manifest_path = first.path("two") / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = {}
    manifest_path.chmod(0o644)
    manifest_path.write_text(json.dumps(manifest))
    verify = cli("verify", "--registry", str(registry_dir), "pair/two")
    assert verify.returncode == 1 and "lists no files" in verify.stdout


# -- 4. resume: metrics equal the uninterrupted run's ---------------------------------------------------

def test_final_train_loss_counts_every_step_not_only_those_since_the_resume():
    from posttrain.training.checkpoints import mean_train_loss

    history = [{"step": 5, "loss": 3.0}, {"step": 10, "loss": 1.0}, {"step": 12, "loss": 0.5}]
    assert mean_train_loss(history, fallback=9.0) == pytest.approx((15 + 5 + 1) / 12)
    assert mean_train_loss([], fallback=9.0) == 9.0


# -- 5. bad data files: one clear message naming the file --------------------------------------------

def _load(path: Path, **extra):
    return load_conversations(DataConfig(sources=[{"path": str(path)}], **extra), path.parent, 0)


@pytest.mark.parametrize("name,content,message", [
    ("latin1.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1"), "row 1: not UTF-8 text (byte 0xe9)"),
    ("utf16.jsonl", '{"text": "hi"}\n'.encode("utf-16"), "UTF-16 text; data files must be UTF-8"),
    ("binary.jsonl", bytes(range(256)) * 4, "binary data, not a text file of rows"),
    ("garbage.parquet", b"PAR1 this is not parquet at all", "cannot be read as parquet"),
    ("ragged.csv", b"prompt,completion\nq1,a1\nq2,a2,extra\n", "row 3: has 3 cells, the header has 2"),
    ("empty_cell.csv", b"prompt,completion\nq1,a1\nq2,\n", "row 3: field completion: completion must be a non-empty string"),
    ("latin1.csv", b"prompt,completion\nq1,a1\nq2,caf\xe9\n", "line 3: not UTF-8 text (byte 0xe9)"),  # read as a stream
])
def test_bad_data_files_end_in_one_message_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        _load(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_csv_numbers_are_answers_not_errors(tmp_path):
    path = tmp_path / "sums.csv"
    path.write_text("prompt,completion\nWhat is 1 plus 1?,2\nWhat is 2 plus 2?,4\n")
    rows, stats = _load(path)
    assert stats["rows_used"] == 2 and {r["messages"][1]["content"] for r in rows} == {"2", "4"}


@pytest.mark.parametrize("damage", ["truncated", "incomplete"])
def test_a_damaged_capture_index_is_one_clear_error(tmp_path, damage):
    from posttrain.kd.shards import read_index

    index = tmp_path / "index.json"
    index.write_text('{"format": "posttrain-topk-v1", "k": 8, "shards": [' if damage == "truncated"
                     else json.dumps({"format": "posttrain-topk-v1", "k": 8, "shards": []}))
    with pytest.raises(UserError, match=f"{index}: (not valid JSON|incomplete index, missing encoding)"):
        read_index(tmp_path)


@pytest.mark.slow
def test_no_training_samples_left_names_the_sources(tmp_path):
    result = posttrain_run_expecting_failure(tmp_path, max_length=4)
    assert "no training samples left after dropping over-long rows from" in result and "tiny_chat_train.jsonl" in result


def posttrain_run_expecting_failure(tmp_path: Path, max_length: int) -> str:
    recipe = write_recipe(tmp_path, f"""
        name: short
        base: {{model: {TINY_MODEL}, chat_template: llama-3.1}}
        stages:
          sft:
            kind: sft
            data: {{sources: [{{path: {ROOT}/data/sft/tiny_chat_train.jsonl}}], max_length: {max_length}}}
            training: {{max_steps: 1}}
        """)
    result = cli("run", str(recipe))
    assert result.returncode != 0
    return result.stderr


# -- 6. signals ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_quick_interrupts_still_stop_cleanly_with_exit_130(tmp_path, registry_dir):
    run = start_run(two_stage_recipe(tmp_path, one_steps=200, sleep=0.05))
    wait_for(lambda: list(registry_dir.glob("work/*/progress.json")))
    run.send_signal(signal.SIGINT)
    time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    run.communicate(timeout=60)
    assert run.returncode == 130
    assert not list(registry_dir.glob("entries/*/manifest.json")) or all(
        json.loads(p.read_text())["kind"] == "model" for p in registry_dir.glob("entries/*/manifest.json"))


def test_an_interrupt_a_library_turns_into_its_own_error_is_still_an_interrupt(monkeypatch, tmp_path, registry_dir):
    """SIGTERM landing inside an import: the library raises e.g. RuntimeError('Failed to import ...')."""
    from posttrain.core import signals
    from posttrain.runner import StageFailed

    monkeypatch.setenv("COUNT_FAIL", "1")
    monkeypatch.setitem(signals._state, "interrupted", True)
    recipe = write_recipe(tmp_path, f"""
        name: boom
        base: {{model: {TINY_MODEL}}}
        stages:
          one: {{kind: count, label: boom}}
        """)
    with pytest.raises(KeyboardInterrupt):
        posttrain.run(recipe)
    monkeypatch.setitem(signals._state, "interrupted", False)
    with pytest.raises(StageFailed):  # without an interrupt, the same error is a stage failure
        posttrain.run(recipe)


# -- 7. a follower rank does not wait for a rank 0 that is gone ---------------------------------------

def test_a_follower_stops_waiting_when_rank_0_is_gone(tmp_path):
    from posttrain.runner import StageFailed, wait_for_commit

    registry = Registry(tmp_path / "reg")
    key = "c" * 64
    work = registry.work_dir(key)
    work.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from posttrain.registry import Registry\n"
        f"with Registry({str(tmp_path / 'reg')!r}).lock({key!r}):\n"
        "    print('locked', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()  # rank 0 killed while building: its lock is released by the OS
    holder.wait()
    started = time.time()
    with pytest.raises(StageFailed, match="rank 0 stopped without committing"):
        wait_for_commit(registry, key, work, "sft")
    assert time.time() - started < 5


# -- 8. lm-eval task files that would run code ---------------------------------------------------------

@pytest.mark.slow
def test_a_task_file_with_function_tags_fails_validate_with_its_line(tmp_path):
    tasks = tmp_path / "tasks"
    shutil.copytree(ROOT / "data" / "eval" / "tasks", tasks)
    (tasks / "custom.yaml").write_text("task: custom\ndataset_path: json\nprocess_docs: !function utils.process\n")
    recipe = write_recipe(tmp_path, f"""
        name: tasks
        base: {{model: {TINY_MODEL}, chat_template: llama-3.1}}
        stages:
          eval: {{kind: eval, models: [base], tasks: [tiny_arith_mc], task_dirs: [{tasks}]}}
        """)
    result = cli("validate", str(recipe))
    assert result.returncode == 2
    assert f"{tasks / 'custom.yaml'}:3: `!function utils.process` runs Python code from the task folder" in result.stderr


# -- 10. a change to the code that produces an entry changes its key ------------------------------------

@pytest.mark.slow
def test_a_change_to_a_module_a_stage_runs_changes_its_key_and_nothing_else_does(tmp_path):
    from posttrain.registry.code_fingerprint import code_fingerprint, module_closure

    root = tmp_path / "src"
    shutil.copytree(ROOT / "posttrain", root / "posttrain", ignore=shutil.ignore_patterns("__pycache__"))
    closure = {p.relative_to(root).as_posix() for p in module_closure("posttrain.kinds.sft.stage", root)}
    assert {"posttrain/kinds/sft/run.py", "posttrain/data/tokens.py", "posttrain/data/formats.py"} <= closure
    before = code_fingerprint("posttrain.kinds.sft.stage", root)
    report = root / "posttrain" / "report.py"
    report.write_text(report.read_text() + "\n# a comment in a module SFT never runs\n")
    code_fingerprint.cache_clear()
    assert code_fingerprint("posttrain.kinds.sft.stage", root) == before
    tokenize = root / "posttrain" / "data" / "tokens.py"
    tokenize.write_text(tokenize.read_text() + "\n# a comment in a module SFT runs: no behaviour, same key\n")
    code_fingerprint.cache_clear()
    assert code_fingerprint("posttrain.kinds.sft.stage", root) == before
    tokenize.write_text(tokenize.read_text() + "\nPADDING_MULTIPLE = 8\n")
    code_fingerprint.cache_clear()
    assert code_fingerprint("posttrain.kinds.sft.stage", root) != before
    before = code_fingerprint("posttrain.kinds.sft.stage", root)
    template = root / "posttrain" / "hf" / "templates" / "llama-3.1.jinja"
    template.write_text(template.read_text() + "{#- changed #}")
    code_fingerprint.cache_clear()
    after_template = code_fingerprint("posttrain.kinds.sft.stage", root)
    assert after_template != before
    code_fingerprint.cache_clear()


def test_plan_says_when_the_stage_code_changed(tmp_path, registry_dir, monkeypatch):
    recipe = two_stage_recipe(tmp_path)
    posttrain.run(recipe)
    import posttrain.planning.stage_keys as keys

    monkeypatch.setattr(keys, "code_fingerprint", lambda module: "different code")
    result = posttrain.runner.plan(posttrain.recipe.load_recipe(recipe), Registry(registry_dir))
    assert {item.name: item.reason for item in result}["one"].startswith("the stage's code changed")


def _plan_keys(package_root: Path) -> dict[str, str]:
    """Stage -> key, as `posttrain plan` of the tiny flagship computes them with the posttrain package
    found under `package_root` (a subprocess, so nothing is cached from this process)."""
    import os
    import subprocess
    import sys

    code = ("import json, posttrain.runner as r, posttrain.recipe as rc, posttrain.registry as g, sys\n"
            "loaded = rc.load_recipe(sys.argv[1], 'tiny')\n"
            "items = r.plan(loaded, g.Registry(sys.argv[2]))\n"
            "import posttrain; assert posttrain.__file__.startswith(sys.argv[3]), posttrain.__file__\n"
            "print(json.dumps({i.name: i.key for i in items}))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "recipes" / "intellect1_instruct.yaml"),
                          str(package_root / "registry"), str(package_root)], capture_output=True, text=True, env=env, check=True,
                         cwd=package_root)
    keys = json.loads(out.stdout.strip().splitlines()[-1])
    assert keys["base"] != "-" and keys["sft.data"] != "-"
    return keys


@pytest.mark.slow
def test_plan_keys_survive_an_upgrade_that_changes_no_output(tmp_path):
    """The key policy (posttrain/registry/code_fingerprint.py): docstrings and comments anywhere, the package
    version, error messages and a new built-in kind change no key; a change to a body a stage runs
    changes that stage's key and those downstream, and nothing upstream."""
    root = tmp_path / "src"
    shutil.copytree(ROOT / "posttrain", root / "posttrain", ignore=shutil.ignore_patterns("__pycache__"))
    before = _plan_keys(root)
    package = root / "posttrain"

    def edit(relative: str, old: str, new: str) -> None:
        path = package / relative
        text = path.read_text()
        assert old in text, (relative, old)
        path.write_text(text.replace(old, new, 1))

    edit("__init__.py", '__version__ = "', '__version__ = "9')                       # an upgrade
    edit("core/errors.py", '"""', '"""A reworded module docstring. ', )                   # shared module docs
    edit("core/errors.py", "exit_code = 2", "exit_code = 2  # a comment")
    edit("kinds/__init__.py", '    "prepare_data": "posttrain.kinds.prepare_data.stage:PrepareDataStage",\n',
         '    "prepare_data": "posttrain.kinds.prepare_data.stage:PrepareDataStage",\n    "extra": "posttrain.kinds.extra.stage:ExtraStage",\n')
    edit("kinds/base.py", '"""', '"""Docs for the stage base, reworded. ')           # a module every kind runs
    edit("training/trainer_common.py", "def ", "# a new comment\ndef ")
    assert _plan_keys(root) == before
    edit("kinds/sft/run.py", "def ", "SFT_CONSTANT = 1\n\n\ndef ")                 # real code, SFT's body
    after = _plan_keys(root)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {name for name in before if name.startswith("sft[")} | {"sft_dev"}, changed


def _move_module(package: Path, old: str, new: str) -> None:
    """Move module `old` (dotted) to `new` inside a copy of the package and point every importer at it,
    as a refactor that only rearranges folders would."""
    import re

    def file_of(dotted: str) -> Path:
        return package.parent.joinpath(*dotted.split(".")).with_suffix(".py")

    target = file_of(new)
    target.parent.mkdir(parents=True, exist_ok=True)
    for folder in target.relative_to(package).parents:
        init = package / folder / "__init__.py"
        if folder != Path(".") and not init.exists():
            init.write_text(f'"""The {folder.name} folder."""\n')
    file_of(old).rename(target)
    pattern = re.compile(rf"\b{re.escape(old)}\b")
    for path in package.rglob("*.py"):
        text = path.read_text()
        if pattern.search(text):
            path.write_text(pattern.sub(new, text))


@pytest.mark.slow
def test_plan_keys_survive_moving_modules_between_folders(tmp_path):
    """Code counts by what it is, not where it lives: moving modules into other folders (their importers
    updated, a new package `__init__.py` on the way) keeps every key of the tiny flagship, the capture
    of the teacher's logits included."""
    root = tmp_path / "src"
    shutil.copytree(ROOT / "posttrain", root / "posttrain", ignore=shutil.ignore_patterns("__pycache__"))
    before = _plan_keys(root)
    package = root / "posttrain"
    _move_module(package, "posttrain.hf.tokenizer_setup", "posttrain.tokenizers.setup")
    _move_module(package, "posttrain.kinds.sft.run", "posttrain.kinds.sft.body")
    _move_module(package, "posttrain.kd.losses", "posttrain.distillation.losses")
    assert not (package / "kinds" / "sft" / "run.py").exists() and (package / "kinds" / "sft" / "body.py").is_file()
    assert _plan_keys(root) == before
    body = package / "kinds" / "sft" / "body.py"
    body.write_text(body.read_text().replace("def ", "SFT_CONSTANT = 1\n\n\ndef ", 1))  # real code still counts
    after = _plan_keys(root)
    assert {name for name in before if before[name] != after[name]} == \
        {name for name in before if name.startswith("sft[")} | {"sft_dev"}
