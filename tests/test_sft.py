"""The SFT stage: loss falls, outputs are chat-ready HF folders, LoRA merges, killed runs resume exactly."""
from __future__ import annotations

import json

import pytest
import torch

import posttrain
from conftest import ROOT, TINY_MODEL, run_and_kill_at_checkpoint, write_recipe
from posttrain.cli import main

TRAIN = ROOT / "data" / "sft" / "tiny_chat_train.jsonl"


def sft_recipe(folder, steps=30, lora=False, save_steps=50, extra=None):
    import yaml

    training = {"max_steps": steps, "per_device_train_batch_size": 16, "learning_rate": 3e-2 if lora else 3e-3,
                "lr_scheduler_type": "constant", **(extra or {})}
    stage = {"kind": "sft", "save_steps": save_steps, "training": training,
             "data": {"sources": [{"path": str(TRAIN)}], "test_size": 16, "max_length": 96}}
    if lora:
        stage["lora"] = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    recipe = {"name": "sfttest", "base": {"model": str(TINY_MODEL), "chat_template": "llama-3.1"},
              "stages": {"sft": stage}}
    return write_recipe(folder, yaml.safe_dump(recipe, sort_keys=False))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import os

    folder = tmp_path_factory.mktemp("sft")
    os.environ["POSTTRAIN_REGISTRY"] = str(folder / "registry")
    try:
        return posttrain.run(sft_recipe(folder, steps=40))
    finally:
        del os.environ["POSTTRAIN_REGISTRY"]


@pytest.mark.slow
def test_loss_falls_and_eval_loss_falls(trained):
    metrics = trained.metrics("sft")
    losses = [p["value"] for p in metrics["loss"]]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert metrics["final_eval_loss"] < losses[0]
    assert metrics["train_samples"] == 240 and metrics["eval_samples"] == 16
    assert metrics["tokens_seen"] > 0 and metrics["tokens_per_second"] > 0
    assert 0 <= metrics["padding_fraction"] < 1
    assert (trained.path("sft") / "tensorboard").is_dir()
    assert metrics["gradient_checkpointing"] is False  # trl's default of True is not applied silently


@pytest.mark.slow
def test_output_loads_chats_in_llama31_format_and_stops_at_eot(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = trained.path("sft")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "<|eot_id|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Reverse the word cat."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    text = tok.decode(prompt["input_ids"][0])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert text.endswith("<|start_header_id|>user<|end_header_id|>\n\nReverse the word cat.<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n")
    out = model.generate(**prompt, max_new_tokens=30, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1]:].tolist()
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot in new and len(new) < 30, tok.decode(new)  # stopped by the generation config's EOS
    assert new[-1] == eot
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == eot


def test_training_key_typo_is_a_validation_error(tmp_path, capsys):
    recipe = sft_recipe(tmp_path, extra={"learning_rat": 1.0})
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "stages.sft.training.learning_rat: not a TrainingArguments/SFTConfig field (did you mean 'learning_rate'?)" in err
    recipe = sft_recipe(tmp_path, extra={"output_dir": "/tmp/x"})
    assert main(["validate", str(recipe)]) == 2
    assert "stages.sft.training.output_dir: set by posttrain" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_output_is_a_full_model_differing_only_in_adapted_modules(tmp_path):
    from safetensors.torch import load_file

    result = posttrain.run(sft_recipe(tmp_path, steps=10, lora=True))
    before = load_file(result.path("base") / "model.safetensors")
    after = load_file(result.path("sft") / "model.safetensors")
    assert set(before) == set(after)  # a plain full checkpoint: no lora_A / lora_B keys
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(".q_proj." in n or ".v_proj." in n for n in changed), sorted(changed)
    assert len(changed) == 2 * 2  # 2 layers x (q_proj, v_proj)
    assert (result.path("sft") / "adapter" / "adapter_config.json").is_file()
    assert result.metrics("sft")["lora"] is True


@pytest.mark.slow
def test_sft_lora_output_feeds_the_next_stage_like_any_checkpoint(tmp_path):
    recipe = sft_recipe(tmp_path, steps=4, lora=True)
    recipe.write_text(recipe.read_text() + f"""
  sft2:
    kind: sft
    model: sft
    data:
      sources: [{{path: {TRAIN}, max_samples: 32}}]
    training: {{max_steps: 2, per_device_train_batch_size: 8}}
""")
    result = posttrain.run(recipe)
    assert result.metrics("sft2")["steps"] == 2


@pytest.mark.slow
def test_killed_sft_resumes_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    reference_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    reference_dir.mkdir(), killed_dir.mkdir()
    monkeypatch.setenv("POSTTRAIN_REGISTRY", str(reference_dir / "registry"))
    reference = posttrain.run(sft_recipe(reference_dir, steps=24, save_steps=6))

    registry = killed_dir / "registry"
    monkeypatch.setenv("POSTTRAIN_REGISTRY", str(registry))
    recipe = sft_recipe(killed_dir, steps=24, save_steps=6)
    run_and_kill_at_checkpoint(recipe, registry, step=12)
    # the base model and the prepared data are entries; the killed SFT left none
    assert not list(registry.glob("entries/*/adapter")) and len(list(registry.glob("entries/*"))) == 2

    resumed = posttrain.run(recipe)
    assert resumed.ran == ["sft"]
    # 12 usually; 6 if the kill landed while checkpoint-12 was being written; 18 under heavy load
    assert resumed.metrics("sft")["resumed_from_step"] in (6, 12, 18)
    ref_losses = [p["value"] for p in reference.metrics("sft")["loss"]]
    got_losses = [p["value"] for p in resumed.metrics("sft")["loss"]]
    assert got_losses[-1] == pytest.approx(ref_losses[-1], rel=1e-4, abs=1e-5)
    a = load_file(reference.path("sft") / "model.safetensors")
    b = load_file(resumed.path("sft") / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["packing", "padding_free"])
def test_packing_and_padding_free_train_and_report_no_padding(tmp_path, mode):
    import yaml

    recipe = sft_recipe(tmp_path, steps=6)
    data = yaml.safe_load(recipe.read_text())
    data["stages"]["sft"][mode] = True
    recipe.write_text(yaml.safe_dump(data))
    metrics = posttrain.run(recipe).metrics("sft")
    losses = [p["value"] for p in metrics["loss"]]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert metrics["padding_fraction"] == 0.0


@pytest.mark.slow
def test_python_api_registers_its_output_like_the_cli(tmp_path, registry_dir):
    from transformers import AutoModelForCausalLM

    path = posttrain.sft(model=TINY_MODEL, data=TRAIN, chat_template="llama-3.1", max_steps=3,
                         per_device_train_batch_size=8)
    assert path.parent == registry_dir / "entries"
    AutoModelForCausalLM.from_pretrained(path)
    assert "api-sft/sft" in posttrain.Registry(registry_dir).refs()
    again = posttrain.sft(model=TINY_MODEL, data=TRAIN, chat_template="llama-3.1", max_steps=3,
                          per_device_train_batch_size=8)
    assert again == path  # cached: same inputs, same entry


def test_chat_data_without_a_template_is_one_clear_error(tmp_path, capsys):
    import yaml

    recipe = sft_recipe(tmp_path, steps=2)
    data = yaml.safe_load(recipe.read_text())
    del data["base"]["chat_template"]
    recipe.write_text(yaml.safe_dump(data))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and "set base.chat_template" in err and "Traceback" not in err


@pytest.mark.slow
def test_editing_the_data_file_reruns_sft_and_nothing_else(tmp_path, capsys):
    import shutil

    import yaml

    local = tmp_path / "train.jsonl"
    shutil.copy(TRAIN, local)
    recipe = sft_recipe(tmp_path, steps=2)
    data = yaml.safe_load(recipe.read_text())
    data["stages"]["sft"]["data"]["sources"] = [{"path": "train.jsonl"}]
    recipe.write_text(yaml.safe_dump(data))
    posttrain.run(recipe)
    local.write_text(local.read_text() + json.dumps({"prompt": "hi", "completion": "there"}) + "\n")
    capsys.readouterr()
    assert main(["plan", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "contents of data.sources.0.path changed" in out and "2 of 3 stages would run" in out


@pytest.mark.slow
def test_eval_from_a_named_heldout_file(tmp_path):
    import yaml

    recipe = sft_recipe(tmp_path, steps=2)
    data = yaml.safe_load(recipe.read_text())
    del data["stages"]["sft"]["data"]["test_size"]
    data["stages"]["sft"]["data"]["eval_sources"] = [{"path": str(ROOT / "data" / "sft" / "tiny_chat_heldout.jsonl")}]
    recipe.write_text(yaml.safe_dump(data))
    metrics = posttrain.run(recipe).metrics("sft")
    assert metrics["train_samples"] == 256 and metrics["eval_samples"] == 64
    assert metrics["final_eval_loss"] > 0
