"""Re-encoding a stored teacher capture (fp16 -> compact) without running the teacher: the
`recode_logits` stage, its resume, and `posttrain recode` for folders outside the registry."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

import posttrain
from conftest import ROOT, TINY_MODEL, write_recipe

TRAIN = ROOT / "data" / "sft" / "tiny_chat_train.jsonl"
TRAIN_ARGS = {"per_device_train_batch_size": 8, "report_to": []}


def capture(**extra) -> dict:
    return {"kind": "capture_logits", "k": 16, "encoding": "fp16", "shard_sequences": 100,
            "data": {"sources": [{"path": str(TRAIN)}], "max_length": 96}, **extra}


def recipe(folder, stages: dict):
    body = {"name": "recode", "base": {"model": str(TINY_MODEL), "chat_template": "llama-3.1"}, "stages": stages}
    return write_recipe(folder, yaml.safe_dump(body, sort_keys=False))


@pytest.fixture(scope="module")
def recoded(tmp_path_factory):
    """An fp16 capture, its compact recode, and a distillation from the recode."""
    folder = tmp_path_factory.mktemp("recode")
    stages = {"teacher": capture(),
              "small": {"kind": "recode_logits", "capture": "teacher", "encoding": "compact"},
              "distill": {"kind": "distill", "model": "base", "teacher_logits": "small",
                          "training": {"max_steps": 2, **TRAIN_ARGS}}}
    return posttrain.run(recipe(folder, stages), registry=folder / "registry", echo=lambda *a: None)


def rows(folder):
    from posttrain.kd.shards import read_index, read_shard

    for item in read_index(folder)["shards"]:
        shard = read_shard(folder / item["file"])
        for index in range(shard.num_sequences):
            yield shard.sequence(index)


@pytest.mark.slow
def test_a_recode_keeps_every_target_within_the_new_encodings_step_and_is_smaller(recoded):
    from posttrain.kd.shards import read_index

    source, target = recoded.path("teacher"), recoded.path("small")
    before, after = read_index(source), read_index(target)
    assert after["encoding"] == "compact" and before["encoding"] == "fp16"
    for field in ("teacher_key", "tokenizer_hash", "data_fingerprint", "vocab_size", "k", "mode"):
        assert after[field] == before[field], field
    assert [s["sequences"] for s in after["shards"]] == [s["sequences"] for s in before["shards"]]
    compared = 0
    for a, b in zip(rows(source), rows(target), strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
        order_a, order_b = np.argsort(a["target_ids"], -1), np.argsort(b["target_ids"], -1)
        ids_a, ids_b = np.take_along_axis(a["target_ids"], order_a, -1), np.take_along_axis(b["target_ids"], order_b, -1)
        np.testing.assert_array_equal(ids_a, ids_b)  # the same ids at every position
        values_a = np.take_along_axis(a["target_values"], order_a, -1)
        values_b = np.take_along_axis(b["target_values"], order_b, -1)
        assert np.abs(values_a - values_b).max() <= 1 / 52 + 1e-4  # the compact code's step
        np.testing.assert_allclose(a["target_tail"], b["target_tail"], atol=2e-3, rtol=1e-3)  # fp16 tail
        compared += len(a["input_ids"])
    assert compared > 1000
    metrics = recoded.metrics("small")
    assert metrics["from_encoding"] == "fp16" and metrics["size_ratio"] < 0.6
    assert metrics["bytes"] < metrics["source_bytes"]


@pytest.mark.slow
def test_distill_takes_the_recode_like_a_capture_and_the_teacher_never_runs_again(recoded):
    entries = recoded.entries
    assert entries["small"].manifest["inputs"] == {"capture": entries["teacher"].key}
    assert entries["distill"].manifest["inputs"]["teacher_logits"] == entries["small"].key
    assert recoded.metrics("distill")["steps"] == 2


@pytest.mark.slow
def test_a_killed_recode_resumes_at_the_first_unfinished_shard(recoded, tmp_path):
    from posttrain.kinds.recode_logits.run import recode_capture

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(recoded.path("small") / "shard-00000.safetensors", work)  # finished before the kill
    metrics = recode_capture(recoded.path("teacher"), tmp_path / "out", work, "compact")
    assert metrics["shards_resumed"] == 1 and metrics["shards"] == 3
    for a, b in zip(rows(tmp_path / "out"), rows(recoded.path("small")), strict=True):
        for field in a:
            np.testing.assert_array_equal(a[field], b[field])


@pytest.mark.slow
def test_posttrain_recode_rewrites_a_folder_and_refuses_what_cannot_be(recoded, tmp_path):
    def recode(*args):
        return subprocess.run([sys.executable, "-m", "posttrain.cli", "recode", *map(str, args)],
                              capture_output=True, text=True, timeout=300)

    done = recode(recoded.path("teacher"), tmp_path / "q8", "--encoding", "q8")
    assert done.returncode == 0, done.stderr
    assert "from fp16 to q8" in done.stdout
    from posttrain.kd.shards import read_index

    assert read_index(tmp_path / "q8")["encoding"] == "q8"
    assert not list(tmp_path.glob(".q8.*")) and not list(tmp_path.glob(".recode-*"))
    again = recode(recoded.path("teacher"), tmp_path / "q8")
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    wrong = recode(recoded.path("teacher"), tmp_path / "x", "--encoding", "q8", "--mass", "0.9")
    assert wrong.returncode == 2 and "needs encoding: compact" in wrong.stderr and "Traceback" not in wrong.stderr
    assert not (tmp_path / "x").exists()
    not_a_capture = recode(ROOT / "data", tmp_path / "y")
    assert not_a_capture.returncode == 2 and "holds no teacher logits" in not_a_capture.stderr


def test_sampled_targets_cannot_become_compact_and_the_message_says_what_can():
    from posttrain.core.errors import UserError
    from posttrain.kinds.recode_logits.run import recoded_meta

    with pytest.raises(UserError, match="compact stores top-k targets only"):
        recoded_meta({"mode": "sampled", "k": 16, "encoding": "fp16"}, "compact", None)
    assert recoded_meta({"mode": "sampled", "k": 16, "encoding": "fp16", "shards": []}, "q8", None) == \
        {"mode": "sampled", "k": 16, "encoding": "q8"}


def test_a_recode_stage_with_mass_but_not_compact_is_a_located_error(tmp_path, capsys):
    from posttrain.cli import main

    path = recipe(tmp_path, {"teacher": capture(), "small": {"kind": "recode_logits", "capture": "teacher",
                                                             "encoding": "q8", "mass": 0.9}})
    assert main(["validate", str(path)]) == 2
    assert "stages.small.mass: a variable number of entries" in capsys.readouterr().err
