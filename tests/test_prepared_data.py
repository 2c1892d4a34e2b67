"""Prepared data (issue 10): a stage's data is read, tokenised and stored once as a registry entry of
memory-mapped Arrow files; stages on the same data and tokenizer share it; it is streamed, made by
worker processes for large data, killed safely, and gives the order and tokens the in-memory loader did."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import posttrain
from conftest import ROOT, TINY_MODEL, cli, write_recipe

TRAIN = ROOT / "data" / "sft" / "tiny_chat_train.jsonl"
WORDS = "the of and to in a is that for it as with was on be by this are from at or an which".split()


def sft_recipe(folder: Path, stages: dict, name: str = "prep") -> Path:
    body = {"name": name, "base": {"model": str(TINY_MODEL), "chat_template": "llama-3.1"}, "stages": stages}
    return write_recipe(folder, yaml.safe_dump(body, sort_keys=False))


def sft(lr: float = 3e-3, data: dict | None = None, **extra) -> dict:
    return {"kind": "sft", "data": data or {"sources": [{"path": str(TRAIN)}], "max_length": 96, "test_size": 16},
            "training": {"max_steps": 2, "learning_rate": lr, "per_device_train_batch_size": 8, "report_to": []},
            **extra}


def chat_rows(path: Path, count: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            handle.write(json.dumps({"messages": [
                {"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))},
                {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 40)))}]}) + "\n")
    return path


def data_entries(registry: Path) -> list[Path]:
    return [p.parent for p in registry.glob("entries/*/prepared.json")]


@pytest.mark.slow
def test_two_sft_stages_on_the_same_data_build_one_prepared_entry(tmp_path, registry_dir):
    result = posttrain.run(sft_recipe(tmp_path, {"sft_a": sft(3e-3), "sft_b": sft(1e-3)}))
    assert result.entries["sft_a.data"].key == result.entries["sft_b.data"].key
    assert "sft_a.data" in result.ran and "sft_b.data" in result.cached  # the second stage spent nothing on data
    assert len(data_entries(registry_dir)) == 1
    a, b = result.metrics("sft_a"), result.metrics("sft_b")
    assert a["prepared_data"] == b["prepared_data"] == result.entries["sft_a.data"].key
    assert a["train_samples"] == b["train_samples"] == 240 and a["final_train_loss"] != b["final_train_loss"]
    # Another learning rate later: plan shows the prepared data as cached, only the SFT stage runs.
    plan = cli("plan", str(sft_recipe(tmp_path, {"sft_a": sft(3e-3), "sft_c": sft(5e-4)})))
    assert plan.returncode == 0, plan.stderr
    lines = {line.split()[0]: line for line in plan.stdout.split("memory estimates")[0].splitlines()
             if line.startswith("  ")}
    assert "cached" in lines["sft_c.data"] and "run" in lines["sft_c"]


@pytest.mark.slow
def test_prepared_data_follows_the_tokenizer_not_the_weights(tmp_path):
    """DPO on an SFT stage tokenises with the tokenizer SFT inherited: retraining SFT with another
    learning rate leaves the DPO data's key alone; another template on the SFT stage does not."""
    from posttrain.planning.stage_keys import compute_keys
    from posttrain.registry.file_fingerprint import FingerprintCache
    from posttrain.recipe.load import load_recipe

    prefs = ROOT / "data" / "dpo" / "tiny_prefs_train.jsonl"

    def keys(**sft_extra):
        dpo = {"kind": "dpo", "model": "sft", "data": {"sources": [{"path": str(prefs)}], "max_length": 96},
               "training": {"max_steps": 1}}
        loaded = load_recipe(sft_recipe(tmp_path, {"sft": sft(**sft_extra), "dpo": dpo}))
        return compute_keys(loaded, FingerprintCache(tmp_path / "fp.json"))

    variant = (ROOT / "posttrain" / "hf" / "templates" / "llama-3.1.jinja").read_text() + "{# a variant #}"
    one, other_lr, other_template = keys(), keys(lr=1e-4), keys(chat_template=variant)
    assert one["sft"].key != other_lr["sft"].key
    assert one["dpo.data"].key == other_lr["dpo.data"].key
    assert one["dpo.data"].key != other_template["dpo.data"].key


@pytest.mark.slow
def test_prepared_order_and_tokens_equal_the_in_memory_loader(tmp_path, monkeypatch):
    """Weights, max_samples, the shuffles and the held-out split give the rows the old in-memory path
    gave, token for token, whether this process or worker processes tokenise."""
    from transformers import AutoTokenizer

    from posttrain.hf.chat_templates import resolve_chat_template
    from posttrain.data import prepare as prepare_module
    from posttrain.data.prepare import open_prepared, prepare
    from posttrain.data.sources import DataConfig
    from support.in_memory import load_conversations
    from posttrain.data.tokens import tokenize_row

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    tokenizer.chat_template = resolve_chat_template("llama-3.1", ROOT).text
    tokenizer.pad_token = tokenizer.eos_token
    first, second = chat_rows(tmp_path / "a.jsonl", 300, 1), chat_rows(tmp_path / "b.jsonl", 200, 2)
    config = DataConfig(sources=[{"path": str(first), "weight": 1.5}, {"path": str(second), "max_samples": 150}],
                        max_length=100, overlong="drop", test_size=0.1)
    rows, _ = load_conversations(config, tmp_path, 7)
    expected = [ids for ids, _, cut in (tokenize_row(tokenizer, r, 100, True) for r in rows) if not cut]
    for workers in (1, 2):
        out, work = tmp_path / f"out{workers}", tmp_path / f"work{workers}"
        out.mkdir()
        if workers == 2:  # small chunks, so two spawned workers share the work
            monkeypatch.setattr(prepare_module, "CHUNK_ROWS", 64)
            monkeypatch.setattr(prepare_module, "SMALL", 0)
            monkeypatch.setattr(prepare_module, "WORKER_START_ROWS", 0)
        stats = prepare("chat", config.model_copy(update={"workers": workers}), tokenizer, tmp_path, 7, out, work)
        assert not work.exists()  # intermediate files go once the entry is written
        cache = tmp_path / f"cache{workers}"
        train, evaluation = open_prepared(out, "train", cache), open_prepared(out, "eval", cache)
        assert len(train) + len(evaluation) == len(expected) == stats["rows_used"] - stats["dropped_samples"]
        assert sorted(map(tuple, list(train["input_ids"]) + list(evaluation["input_ids"]))) == sorted(map(tuple, expected))
        # Held out: the rows datasets' train_test_split picks; both splits keep the mixture's order.
        split = __import__("datasets").Dataset.from_dict({"i": list(range(len(expected)))}).train_test_split(
            test_size=0.1, seed=7)
        held = set(split["test"]["i"])
        assert list(train["input_ids"]) == [ids for i, ids in enumerate(expected) if i not in held]
        assert list(evaluation["input_ids"]) == [ids for i, ids in enumerate(expected) if i in held]
        assert stats["sources"][0]["rows_used"] == 450 and stats["sources"][1]["rows_used"] == 150
        assert sum(s["dropped"] for s in stats["sources"]) == stats["dropped_samples"] > 0


@pytest.mark.slow
def test_training_reads_the_prepared_files_memory_mapped(tmp_path):
    result = posttrain.run(sft_recipe(tmp_path, {"sft": sft()}))
    from posttrain.data.prepare import open_prepared

    train = open_prepared(result.path("sft.data"), "train", tmp_path / "cache")
    assert train.cache_files and all(Path(f["filename"]).parent == tmp_path / "cache" / "prepared-train"
                                     for f in train.cache_files)
    assert set(train.column_names) == {"input_ids", "labels", "length", "source", "label_tokens"}
    assert result.metrics("sft")["tokens_seen"] > 0 and result.metrics("sft")["label_tokens"] == int(
        np.asarray(train.data.column("label_tokens")).sum())


@pytest.mark.slow
@pytest.mark.parametrize("row,message", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     "row 3: field messages.1.content: "),
    ({"prompt": "hi"}, "row 3:"),
])
def test_bad_rows_still_name_file_row_and_field(tmp_path, row, message):
    data = tmp_path / "rows.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    data.write_text("\n".join([good, good, json.dumps(row)]) + "\n")
    result = cli("run", str(sft_recipe(tmp_path, {"sft": sft(data={"sources": [{"path": str(data)}]})})))
    assert result.returncode == 2  # a user error
    assert f"{data}: {message}" in result.stderr and "Traceback" not in result.stderr
    assert "on_bad_rows: skip" in result.stderr


@pytest.mark.slow
def test_a_kill_during_preparation_leaves_no_entry_and_a_rerun_completes(tmp_path, registry_dir):
    data = chat_rows(tmp_path / "many.jsonl", 20000)
    recipe = sft_recipe(tmp_path, {"sft": sft(data={"sources": [{"path": str(data)}], "max_length": 128,
                                                    "workers": 1})})
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(recipe)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list(registry_dir.glob("work/*/prepare/tokens-train-00000.arrow")):
        assert proc.poll() is None, "preparation finished before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not data_entries(registry_dir)  # only the base model was committed
    assert len(list(registry_dir.glob("entries/*"))) == 1
    result = posttrain.run(recipe)
    assert result.ran == ["sft.data", "sft"]
    assert result.metrics("sft.data")["rows_used"] == 20000 == result.metrics("sft")["train_samples"]
    assert cli("verify", "--registry", str(registry_dir)).returncode == 0


def test_followers_wait_for_the_data_rank_0_prepares(tmp_path, monkeypatch, registry_dir):
    """Under a launch, only rank 0 runs a prepare step; another rank waits for its entry."""
    from posttrain import runner
    from posttrain.registry.file_fingerprint import FingerprintCache
    from posttrain.planning.stage_keys import compute_keys
    from posttrain.recipe.load import load_recipe
    from posttrain.kinds.prepare_data.stage import PrepareDataStage

    calls = []
    original = PrepareDataStage.run

    def counted(self, config, ctx):
        calls.append(ctx.rank)
        time.sleep(0.5)  # the follower is waiting by now
        return original(self, config, ctx)

    monkeypatch.setattr(PrepareDataStage, "run", counted)
    loaded = load_recipe(sft_recipe(tmp_path, {"sft": sft()}))
    reg = runner.open_registry(loaded)
    keys = compute_keys(loaded, FingerprintCache(tmp_path / "fp.json"))
    result = runner.RunResult(loaded, reg)
    leader = runner._Run(loaded, reg, keys, result, 0, 2, lambda line: None, True)
    follower = runner._Run(loaded, reg, keys, runner.RunResult(loaded, reg), 1, 2, lambda line: None, True)
    result.entries["base"] = runner._build(leader, "base", "")
    waited = {}
    thread = threading.Thread(target=lambda: waited.update(entry=runner._build(follower, "sft.data", "")))
    thread.start()
    built = runner._build(leader, "sft.data", "")
    thread.join(60)
    assert calls == [0] and waited["entry"].key == built.key


def test_a_float_in_e_notation_is_a_float(tmp_path):
    """`learning_rate=1e-4` (and `1e-4` in a recipe) is the number people mean, not the text YAML 1.1 reads."""
    from posttrain.recipe.load import load_recipe

    recipe = sft_recipe(tmp_path, {"sft": sft()})
    recipe.write_text(recipe.read_text().replace("learning_rate: 0.003", "learning_rate: 3e-3"))
    loaded = load_recipe(recipe, overrides=["stages.sft.training.weight_decay=1e-2"])
    training = loaded.stages["sft"].config.training
    assert training["learning_rate"] == 0.003 and training["weight_decay"] == 0.01
