"""Skipping what exists, re-running exactly what changed, and explaining why in `plan`."""
from __future__ import annotations

import json

import posttrain
from conftest import count_runs, two_stage_recipe, write_recipe
from posttrain.cli import main


def ran(result) -> list[str]:
    return [n for n in result.ran if n != "base"]


def test_second_run_executes_nothing_and_changes_rerun_only_what_depends_on_them(tmp_path, registry_dir):
    recipe = two_stage_recipe(tmp_path)
    assert ran(posttrain.run(recipe)) == ["one", "two"]
    again = posttrain.run(recipe)
    assert again.ran == [] and again.cached == ["base", "one", "two"]
    assert ran(posttrain.run(recipe, overrides=["stages.two.steps=5"])) == ["two"]
    assert ran(posttrain.run(recipe, overrides=["stages.one.steps=4", "stages.two.steps=5"])) == ["one", "two"]
    assert len(count_runs(registry_dir)) == 5  # one, two; two; one, two


def test_renaming_a_stage_reuses_its_entry(tmp_path):
    recipe = two_stage_recipe(tmp_path)
    first = posttrain.run(recipe)
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(recipe.read_text().replace("one:", "first:").replace("model: one", "model: first"))
    second = posttrain.run(renamed)
    assert second.ran == []
    assert second.entries["first"].key == first.entries["one"].key


def test_editing_a_local_file_reruns_the_stage_that_reads_it(tmp_path):
    import shutil

    from conftest import TINY_MODEL

    model = tmp_path / "model"
    shutil.copytree(TINY_MODEL, model)
    recipe = write_recipe(tmp_path, "name: f\nbase:\n  model: ./model\nstages:\n  a: {kind: count}\n")
    posttrain.run(recipe)
    assert posttrain.run(recipe).ran == []
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (model / "config.json").write_text(json.dumps(config))
    assert posttrain.run(recipe).ran == ["base", "a"]


def test_plan_says_what_is_cached_and_why_the_rest_would_run(tmp_path, capsys):
    recipe = two_stage_recipe(tmp_path)
    assert main(["plan", str(recipe)]) == 0
    assert capsys.readouterr().out.count("never built") == 3
    posttrain.run(recipe)
    capsys.readouterr()
    assert main(["plan", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert out.count(" cached ") == 3 and "0 of 3 stages would run" in out
    assert main(["plan", str(recipe), "stages.one.steps=7"]) == 0
    out = capsys.readouterr().out
    one = next(line for line in out.splitlines() if line.strip().startswith("one "))
    two = next(line for line in out.splitlines() if line.strip().startswith("two "))
    assert "steps: 2 -> 7" in one
    assert "input model (one) changed" in two
    assert "2 of 3 stages would run" in out


def test_profile_refs_live_apart_from_the_real_ones(tmp_path):
    recipe = two_stage_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + "profiles:\n  quick:\n    stages:\n      one: {steps: 1}\n")
    posttrain.run(recipe)
    quick = posttrain.run(recipe, profile="quick")
    refs = quick.registry.refs()
    assert {"pair/one", "pair@quick/one"} <= set(refs)
    assert refs["pair/one"] != refs["pair@quick/one"]


def test_base_entry_is_a_loadable_folder_with_template_and_eos(tmp_path):
    from transformers import AutoTokenizer

    result = posttrain.run(two_stage_recipe(tmp_path))
    base = result.path("base")
    tok = AutoTokenizer.from_pretrained(base)
    assert tok.eos_token == "<|eot_id|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    gen = json.loads((base / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == tok.convert_tokens_to_ids("<|eot_id|>")
    manifest = json.loads((base / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json", "README.md"}
    assert manifest["metrics"]["source"] == "local"
    assert "Lineage" in (base / "README.md").read_text()


def test_operational_settings_do_not_change_keys(tmp_path):
    """How often to log or checkpoint changes how a stage runs, not what it writes: no rebuild."""
    from conftest import TINY_MODEL, write_recipe
    from posttrain.registry.file_fingerprint import FingerprintCache
    from posttrain.planning.stage_keys import compute_keys
    from posttrain.recipe import load_recipe

    def key(**training):
        recipe = write_recipe(tmp_path, f"""
            name: ops
            base: {{model: {TINY_MODEL}, chat_template: llama-3.1}}
            stages:
              sft:
                kind: sft
                save_steps: {training.pop('save_steps', 50)}
                data: {{sources: [{{path: data.jsonl}}]}}
                training: {training}
            """)
        return compute_keys(load_recipe(recipe), FingerprintCache(tmp_path / "fp.json"))["sft"].key

    (tmp_path / "data.jsonl").write_text('{"text": "hello"}\n')
    first = key(logging_steps=1, learning_rate=1e-3)
    assert key(logging_steps=25, report_to=[], save_steps=5, learning_rate=1e-3) == first
    # Speed settings: the same function computed faster (keys.SPEED_SETTINGS).
    assert key(logging_steps=1, learning_rate=1e-3, torch_compile=True, torch_compile_mode="max-autotune",
               dataloader_pin_memory=False, dataloader_prefetch_factor=4) == first
    assert key(logging_steps=1, learning_rate=2e-3) != first


def test_a_plugin_kinds_hooks_reach_plan_and_the_closing_line(tmp_path, registry_dir):
    """The add-a-kind checklist's hooks, as a plugin overrides them (tests/plugins): plan shows its memory
    estimate, and its stages' closing lines and `run`'s table end with its headline metric."""
    from posttrain.recipe import load_recipe
    from posttrain.registry import Registry
    from posttrain.runner import plan

    recipe = two_stage_recipe(tmp_path)
    items = {item.name: item for item in plan(load_recipe(recipe), Registry(registry_dir))}
    assert items["one"].memory == "a counter to 2 (no model in memory)"  # its steps: 2
    lines: list[str] = []
    posttrain.run(recipe, echo=lines.append)
    assert any(" one " in line and " done " in line and line.endswith("steps 2") for line in lines), lines
