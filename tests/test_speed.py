"""Optional fast paths (torch.compile, Liger's kernels): accepted, checked, out of keys, recorded."""
from __future__ import annotations

import json

import pytest

import posttrain
from conftest import ROOT, TINY_MODEL, write_recipe
from posttrain.cli import main
from posttrain.training.speed import speed_settings

SFT_DATA = ROOT / "data" / "sft" / "tiny_chat_train.jsonl"


def sft_recipe(folder, **training) -> object:
    settings = ", ".join(f"{k}: {json.dumps(v)}" for k, v in training.items())
    return write_recipe(folder, f"""
        name: fast
        base: {{model: {TINY_MODEL}, chat_template: llama-3.1}}
        stages:
          sft:
            kind: sft
            data: {{sources: [{{path: {SFT_DATA}}}], max_length: 96}}
            training: {{max_steps: 3, per_device_train_batch_size: 4, learning_rate: 0.001{', ' + settings if settings else ''}}}
        """)


def test_liger_kernels_leave_fused_cross_entropy_to_posttrain_and_the_cpu_goes_without():
    on_gpu = speed_settings({"use_liger_kernel": True, "liger_kernel_config": {"rope": False}}, cuda=True)
    assert on_gpu["liger_kernel_config"] == {"rope": False, "fused_linear_cross_entropy": False}
    on_cpu = speed_settings({"use_liger_kernel": True, "liger_kernel_config": {"rope": False}, "seed": 1}, cuda=False)
    assert on_cpu == {"seed": 1}
    assert speed_settings({"torch_compile": True}, cuda=False) == {"torch_compile": True}


def test_liger_without_its_package_is_a_recipe_error(tmp_path, capsys, monkeypatch):
    """Whether or not liger-kernel is installed on the machine running the tests: both cases are set."""
    import posttrain.training.speed as speed

    recipe = sft_recipe(tmp_path, use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": True})
    monkeypatch.setattr(speed, "liger_installed", lambda: False)
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "stages.sft.training.use_liger_kernel: needs the liger-kernel package (pip install 'posttrain[liger]')" in err
    assert "stages.sft.training.liger_kernel_config.fused_linear_cross_entropy: not supported" in err
    assert str(recipe) in err and "Traceback" not in err
    monkeypatch.setattr(speed, "liger_installed", lambda: True)
    assert main(["validate", str(recipe)]) == 2  # the fused cross-entropy is still refused
    err = capsys.readouterr().err
    assert "use_liger_kernel" not in err and "fused_linear_cross_entropy: not supported" in err


@pytest.mark.slow
def test_a_compiled_sft_run_is_recorded_and_its_entry_serves_the_plain_recipe(tmp_path, registry_dir):
    """torch.compile through the Trainer (dynamo's 'eager' backend: the graph capture without a C++
    build), recorded under the manifest's "operational"; the same recipe without it is the same entry."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    compiled = posttrain.run(sft_recipe(tmp_path / "a", torch_compile=True, torch_compile_backend="eager"))
    manifest = json.loads((compiled.path("sft") / "manifest.json").read_text())
    operational = manifest["operational"]  # every setting left out of the key, defaults included
    assert operational["training.torch_compile"] is True and operational["training.torch_compile_backend"] == "eager"
    assert operational["save_steps"] == 50 and "training.max_steps" not in operational
    losses = [point["value"] for point in manifest["metrics"]["loss"]]
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    plain = posttrain.run(sft_recipe(tmp_path / "b"))
    assert plain.path("sft") == compiled.path("sft")
    assert "sft" in plain.cached and "sft" not in plain.ran


def test_the_attention_kernel_is_switched_on_the_loaded_model_and_a_missing_one_is_one_clear_error():
    from transformers import AutoModelForCausalLM

    from posttrain.core.errors import UserError
    from posttrain.training.speed import choose_attention

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    choose_attention(model, "eager")
    assert model.config._attn_implementation == "eager"
    choose_attention(model, None)
    assert model.config._attn_implementation == "eager"
    # A kernel transformers does not know (flash_attention_2 on a machine without flash-attn ends the same way).
    with pytest.raises(UserError, match=r"^attn_implementation: 'no_such_kernel' cannot be used here: "):
        choose_attention(model, "no_such_kernel")


def test_speed_settings_keep_the_key(tmp_path):
    from posttrain.registry.file_fingerprint import FingerprintCache
    from posttrain.planning.stage_keys import compute_keys
    from posttrain.recipe import load_recipe

    def key(folder, extra: str = "", **training):
        folder.mkdir()
        recipe = sft_recipe(folder, **training)
        if extra:
            recipe.write_text(recipe.read_text().replace("    kind: sft\n", f"    kind: sft\n    {extra}\n"))
            assert extra in recipe.read_text()
        return compute_keys(load_recipe(recipe), FingerprintCache(tmp_path / "fp.json"))["sft"].key

    plain = key(tmp_path / "plain")
    assert key(tmp_path / "flash", "attn_implementation: flash_attention_2") == plain
    assert key(tmp_path / "fast", torch_compile=True, torch_compile_backend="inductor",
               dataloader_persistent_workers=True) == plain
    assert key(tmp_path / "decay", weight_decay=0.1) != plain  # what it learns does count
