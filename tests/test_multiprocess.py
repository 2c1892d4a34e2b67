"""Two CPU processes (gloo): the SFT stage matches one process with the same global batch."""
from __future__ import annotations

import json

import pytest
import yaml

import posttrain
from conftest import ROOT, TINY_MODEL, cli, write_recipe

TRAIN = ROOT / "data" / "sft" / "tiny_chat_train.jsonl"


def recipe(folder, per_device_batch):
    body = {"name": "ddp", "base": {"model": str(TINY_MODEL), "chat_template": "llama-3.1"},
            "stages": {"sft": {"kind": "sft", "data": {"sources": [{"path": str(TRAIN)}], "max_length": 96},
                               "training": {"max_steps": 6, "per_device_train_batch_size": per_device_batch,
                                            "learning_rate": 3e-3, "lr_scheduler_type": "constant",
                                            "report_to": []}}}}
    return write_recipe(folder, yaml.safe_dump(body, sort_keys=False), name=f"r{per_device_batch}.yaml")


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, registry_dir):
    launched = cli("run", str(recipe(tmp_path, 8)), "--launcher", "torchrun", "--nproc", "2", timeout=600)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert launched.stdout.count(" ran, ") == 1  # rank 1 keeps quiet
    registry = posttrain.Registry(registry_dir)
    two = json.loads((registry_dir / "entries" / registry.get_ref("ddp/sft") / "manifest.json").read_text())
    single = posttrain.run(recipe(tmp_path, 16))
    assert two["key"] != single.entries["sft"].key  # different configs, both built
    two_losses = [p["value"] for p in two["metrics"]["loss"]]
    one_losses = [p["value"] for p in single.metrics("sft")["loss"]]
    assert len(two_losses) == len(one_losses) == 6
    for a, b in zip(two_losses, one_losses):
        assert abs(a - b) < 1e-4, (two_losses, one_losses)
    assert cli("verify", "--registry", str(registry_dir)).returncode == 0
    assert not any((registry_dir / "work").iterdir())  # followers' scratch went with the commit
    assert not list(registry_dir.glob("entries/*/training_args.bin"))


def test_launch_commands_take_the_recipes_launch_settings(tmp_path):
    import argparse
    from pathlib import Path

    import pytest

    from posttrain.cli import launch_command
    from posttrain.core.errors import UserError
    from posttrain.recipe import load_recipe

    flagship = ROOT / "recipes" / "intellect1_instruct.yaml"
    launch = load_recipe(flagship).recipe.launch

    def args(**kw):
        base = {"recipe_file": str(flagship), "overrides": ["seed=1"], "profile": None, "registry": None,
                "launcher": "accelerate", "nproc": None, "accelerate_config": None}
        return argparse.Namespace(**{**base, **kw})

    command = launch_command(args(), launch, flagship.parent)
    config = command[command.index("--config_file") + 1]
    assert Path(config).resolve() == (ROOT / "configs" / "accelerate" / "fsdp.yaml").resolve()
    assert command[command.index("--num_processes") + 1] == "8"
    assert command[command.index("posttrain.cli") + 1:] == ["run", str(flagship), "seed=1"]
    torchrun = launch_command(args(launcher="torchrun", nproc=2), launch, flagship.parent)
    assert torchrun[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    with pytest.raises(UserError, match="accelerate config not found"):
        launch_command(args(accelerate_config=str(tmp_path / "nope.yaml")))
