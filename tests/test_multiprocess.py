"""Two CPU processes (gloo): the SFT stage matches one process with the same global batch."""
from __future__ import annotations

import json

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


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, registry_dir):
    launched = cli("run", str(recipe(tmp_path, 8)), "--launcher", "torchrun", "--nproc", "2", timeout=600)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert launched.stdout.count(" ran, ") == 1  # rank 1 keeps quiet
    registry = posttrain.Registry(registry_dir)
    two = json.loads((registry_dir / "entries" / registry.get_ref("ddp/sft") / "manifest.json").read_text())
    single = posttrain.run(recipe(tmp_path, 16))
    assert two["key"] != single.entries["sft"].key  # different configs, both built
    two_losses = [p["loss"] for p in two["metrics"]["loss"]]
    one_losses = [p["loss"] for p in single.metrics("sft")["loss"]]
    assert len(two_losses) == len(one_losses) == 6
    for a, b in zip(two_losses, one_losses):
        assert abs(a - b) < 1e-4, (two_losses, one_losses)
    assert cli("verify", "--registry", str(registry_dir)).returncode == 0
    assert not any((registry_dir / "work").iterdir())  # followers' scratch went with the commit
    assert not list(registry_dir.glob("entries/*/training_args.bin"))
