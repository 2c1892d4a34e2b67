"""`training.report_to`: wandb, mlflow, trackio and tensorboard runs per training stage, named
`<recipe>/<stage>` and carrying the stage's lineage, each in its own offline mode."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from conftest import ROOT, write_recipe
from support.wandb_offline import offline_run

TRACKERS = "[wandb, mlflow, trackio, tensorboard]"


def tracked_recipe(folder, report_to: str = TRACKERS):
    return write_recipe(folder, f"""
        name: tracked
        base: {{model: {ROOT}/data/tiny-llama, chat_template: llama-3.1, dtype: float32}}
        stages:
          sft:
            kind: sft
            data: {{sources: [{{path: {ROOT}/data/sft/tiny_chat_train.jsonl, max_samples: 16}}], max_length: 96}}
            training: {{max_steps: 3, learning_rate: 1.0e-3, per_device_train_batch_size: 4, report_to: {report_to}}}
          dpo:
            kind: dpo
            model: sft
            data: {{sources: [{{path: {ROOT}/data/dpo/tiny_prefs_train.jsonl, max_samples: 8}}], max_length: 96}}
            training: {{max_steps: 2, per_device_train_batch_size: 4, report_to: [wandb, tensorboard]}}
        """)


@pytest.mark.slow
def test_each_training_stage_reports_to_every_tracker_named_and_with_its_lineage(tmp_path, monkeypatch):
    recipe = tracked_recipe(tmp_path)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb-sft"),
           "MLFLOW_TRACKING_URI": f"file://{tmp_path / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
           "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    env.pop("WANDB_PROJECT", None)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    done = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--registry",
                           str(tmp_path / "registry")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    keys = {name: json.loads((tmp_path / "registry" / "refs" / "tracked" / f"{name}.json").read_text())["key"]
            for name in ("base", "sft", "dpo")}

    runs = sorted((tmp_path / "wandb-sft" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one per training stage
    sft_run, dpo_run = (offline_run(run) for run in runs)
    assert (sft_run["name"], sft_run["project"]) == ("tracked/sft", "tracked")
    assert dpo_run["name"] == "tracked/dpo" and "dpo" in dpo_run["tags"]
    lineage = sft_run["config"]["posttrain"]
    assert lineage["key"] == keys["sft"] and lineage["inputs"]["model"] == {"stage": "base", "key": keys["base"]}
    assert dpo_run["config"]["posttrain"]["inputs"]["model"] == {"stage": "sft", "key": keys["sft"]}
    assert sft_run["config"]["learning_rate"] == 1.0e-3 and sft_run["history_steps"] >= 3  # the Trainer's own

    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store for reading
    client = mlflow.MlflowClient(f"file://{tmp_path / 'mlruns'}")
    experiment = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked/sft" and run.data.tags["posttrain.key"] == keys["sft"]
    assert "loss" in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id, "posttrain")] == ["posttrain/lineage.json"]

    with sqlite3.connect(tmp_path / "trackio" / "tracked.db") as db:
        ((name, config),) = db.execute("select run_name, config from configs").fetchall()
        steps = db.execute("select count(*) from metrics").fetchone()[0]
    assert name == "tracked/sft" and json.loads(config)["posttrain"]["key"] == keys["sft"] and steps >= 3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for stage in ("sft", "dpo"):
        board = tmp_path / "registry" / "entries" / keys[stage] / "tensorboard"
        texts = {}
        for folder in {p.parent for p in board.rglob("events.out.tfevents.*")}:
            events = EventAccumulator(str(folder), size_guidance={"tensors": 0}).Reload()
            texts.update({tag: events.Tensors(tag) for tag in events.Tags()["tensors"]})
        lineage = json.loads(texts["posttrain/lineage/text_summary"][0].tensor_proto.string_val[0].decode()
                             .strip("`\n"))
        assert lineage["key"] == keys[stage]


def test_trackers_change_no_key(tmp_path):
    from posttrain.recipe import load_recipe
    from posttrain.runner import open_registry, plan

    keys = []
    for report_to in ("[]", TRACKERS):
        loaded = load_recipe(tracked_recipe(tmp_path, report_to))
        keys.append({item.name: item.key for item in plan(loaded, open_registry(loaded, tmp_path / "registry"))})
    assert keys[0] == keys[1]


def test_the_tracker_labels_are_not_part_of_any_stage_key():
    """Changing how runs are named and labelled rebuilds nothing: stage bodies reach it through the
    console package, which keys leave out (code_fingerprint.NEUTRAL)."""
    from posttrain.registry.code_fingerprint import NEUTRAL, code_files

    assert "posttrain.console" in NEUTRAL
    for kind in ("sft", "dpo", "distill"):
        files = code_files(f"posttrain.kinds.{kind}.stage")
        assert f"posttrain/kinds/{kind}/run.py" in files and not any("console" in f for f in files), files
