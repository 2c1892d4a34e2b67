"""capture_logits and distill end to end on tiny models."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import posttrain
from conftest import ROOT, TINY_MODEL, write_recipe
from posttrain.cli import main

TRAIN = ROOT / "data" / "sft" / "tiny_chat_train.jsonl"
HELDOUT = ROOT / "data" / "sft" / "tiny_chat_heldout.jsonl"
TRAIN_ARGS = {"per_device_train_batch_size": 8, "learning_rate": 3e-3, "lr_scheduler_type": "constant"}


def recipe_with(folder, stages, name="kd"):
    body = {"name": name, "base": {"model": str(TINY_MODEL), "chat_template": "llama-3.1"}, "stages": stages}
    return write_recipe(folder, yaml.safe_dump(body, sort_keys=False))


def capture(teacher="base", k=32, encoding="fp16", **extra):
    return {"kind": "capture_logits", "teacher": teacher, "k": k, "encoding": encoding, "shard_sequences": 100,
            "data": {"sources": [{"path": str(TRAIN)}], "max_length": 96}, **extra}


def teacher_logp(model_dir, input_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([input_ids])).logits[0].float(), -1)


@pytest.mark.slow
@pytest.mark.parametrize("encoding,tolerance", [("fp16", 0.01), ("q8", 1 / 32 + 1e-4), ("q12", 1 / 256 + 1e-4),
                                               ("compact", 1 / 52 + 1e-4)])
def test_stored_values_equal_the_teachers_log_softmax(tmp_path, encoding, tolerance):
    from posttrain.kd.shards import read_index, read_shard

    result = posttrain.run(recipe_with(tmp_path, {"capture": capture(k=16, encoding=encoding)}))
    folder = result.path("capture")
    index = read_index(folder)
    assert index["k"] == 16 and index["vocab_size"] == 1024 and index["encoding"] == encoding
    shard = read_shard(folder / index["shards"][0]["file"])
    for seq in (0, 5):
        item = shard.sequence(seq)
        full = teacher_logp(result.path("base"), item["input_ids"].tolist())
        expected_ids = full.topk(16, -1).indices.numpy()
        np.testing.assert_array_equal(np.sort(item["target_ids"], -1), np.sort(expected_ids, -1))
        at_ids = full.gather(-1, torch.from_numpy(item["target_ids"])).numpy()
        assert np.abs(item["target_values"] - at_ids).max() <= tolerance
    metrics = result.metrics("capture")
    assert metrics["tokens"] == sum(len(json.loads(x)["messages"]) for x in []) or metrics["tokens"] > 0
    assert metrics["shards"] == 3 and metrics["bytes_per_token"] > 0


@pytest.mark.slow
def test_self_distillation_starts_at_zero_loss_so_positions_are_aligned(tmp_path):
    stages = {"capture": capture(k=1024),  # k = V: the whole distribution
              "distill": {"kind": "distill", "model": "base", "teacher_logits": "capture",
                          "training": {"max_steps": 1, **TRAIN_ARGS, "learning_rate": 1e-9}}}
    result = posttrain.run(recipe_with(tmp_path, stages))
    first = result.metrics("distill")["kd_loss"][0]["value"]
    # The exact tail stored beside the fp16 values makes them one distribution: only second-order storage
    # error is left (a one-position shift would give a KL of several nats).
    assert first <= 1e-6


@pytest.mark.slow
def test_distilled_student_is_closer_to_the_teacher_than_sft_on_the_same_tokens(tmp_path):
    steps = {"max_steps": 40, **TRAIN_ARGS}
    sft_data = {"sources": [{"path": str(TRAIN)}], "max_length": 96}
    stages = {
        "teacher": {"kind": "sft", "data": sft_data, "training": {"max_steps": 80, **TRAIN_ARGS, "per_device_train_batch_size": 16}},
        "capture": capture(teacher="teacher", k=64),
        "student_kd": {"kind": "distill", "model": "base", "teacher_logits": "capture", "training": steps},
        "student_sft": {"kind": "sft", "model": "base", "data": sft_data, "training": steps},
    }
    result = posttrain.run(recipe_with(tmp_path, stages))
    from transformers import AutoTokenizer

    from posttrain.data.tokens import IGNORE, tokenize_row

    tok = AutoTokenizer.from_pretrained(result.path("teacher"))
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines()][:32]

    def heldout_kl(student: str) -> float:
        total, count = 0.0, 0
        for row in rows:
            ids, labels, _ = tokenize_row(tok, row, 96, True)
            p = teacher_logp(result.path("teacher"), ids)[:-1]
            q = teacher_logp(result.path(student), ids)[:-1]
            trained = torch.tensor([label != IGNORE for label in labels[1:]])
            kl = (p.exp() * (p - q)).sum(-1)
            total += float(kl[trained].sum())
            count += int(trained.sum())
        return total / count

    kd, sft = heldout_kl("student_kd"), heldout_kl("student_sft")
    assert kd < sft, (kd, sft)
    assert result.metrics("student_kd")["steps"] == result.metrics("student_sft")["steps"] == 40


@pytest.mark.slow
def test_mismatched_tokenizer_is_one_clear_error(tmp_path, capsys):
    other = tmp_path / "other-model"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "--out", str(other),
                    "--vocab-size", "900", "--seed", "3"], check=True, capture_output=True)
    body = {"name": "mismatch", "base": {"model": str(TINY_MODEL), "chat_template": "llama-3.1"},
            "models": {"student": {"model": str(other), "chat_template": "llama-3.1"}},
            "stages": {"capture": capture(k=8),
                       "distill": {"kind": "distill", "model": "student", "teacher_logits": "capture",
                                   "training": {"max_steps": 1}}}}
    recipe = write_recipe(tmp_path, yaml.safe_dump(body))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "the student's tokenizer is not compatible with the teacher logits in stage input 'capture'" in err
    assert "teacher vocab size 1024 > student's 900" in err and "Traceback" not in err


@pytest.mark.slow
def test_corrupt_shard_is_one_clear_error(tmp_path, capsys):
    stages = {"capture": capture(k=8),
              "distill": {"kind": "distill", "model": "base", "teacher_logits": "capture", "training": {"max_steps": 1}}}
    recipe = recipe_with(tmp_path, stages)
    posttrain.run(recipe, overrides=["stages.distill.training.max_steps=1"])
    entry = posttrain.Registry(tmp_path / "registry").resolve("kd/capture")
    shard = tmp_path / "registry" / "entries" / entry / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8:8 + header_len])["topk_values"]["data_offsets"]
    at = 8 + header_len + start + 64
    data[at:at + 64] = b"\xff" * 64  # fp16 NaNs in the stored values; the file keeps its size
    # Bit rot: the file keeps its size, inode and mtime, so only reading it can tell (a visible write
    # would make the run set the entry aside and rebuild it; see test_registry_integrity).
    before = shard.stat()
    shard.chmod(0o644)
    shard.write_bytes(bytes(data))
    shard.chmod(before.st_mode)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    # Shards are checked as they are read: one epoch (40 steps of 8 > 256 sequences) reads every sequence.
    assert main(["run", str(recipe), "stages.distill.alpha=0.5", "stages.distill.training.max_steps=40",
                 "stages.distill.training.per_device_train_batch_size=8"]) == 2
    err = capsys.readouterr().err
    assert f"teacher-logit shard {shard}" in err and "NaN or infinite" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["fp16", "compact"])
def test_capture_resumes_shard_by_shard(tmp_path, encoding):
    """A shard finished before an interruption is reused; the rest are captured."""
    from posttrain.registry import Registry
    from posttrain.kinds import StageContext, get_stage

    result = posttrain.run(recipe_with(tmp_path, {"capture": capture(k=8, encoding=encoding)}))
    stage = get_stage("capture_logits")
    config = result.recipe.stages["capture"].config
    work = tmp_path / "work"
    (work / "shards").mkdir(parents=True)
    shutil.copy(result.path("capture") / "shard-00000.safetensors", work / "shards")
    out = tmp_path / "out"
    out.mkdir()
    base = Registry(tmp_path / "registry").load(result.entries["base"].key)
    from posttrain.kinds import InputEntry

    data = Registry(tmp_path / "registry").load(result.entries["capture.data"].key)
    ctx = StageContext("capture", {"teacher": InputEntry(base.key, base.path, "model", base.manifest),
                                   "data": InputEntry(data.key, data.path, "data", data.manifest)},
                       out, work, ROOT, 42)
    metrics = stage.run(config, ctx)
    assert metrics["shards_resumed"] == 1 and metrics["shards"] == 3
    from posttrain.kd.shards import read_shard

    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        got, want = read_shard(out / name), read_shard(result.path("capture") / name)
        assert got.meta == want.meta  # header key order is not stable across writes; contents are
        for index in range(got.num_sequences):
            a, b = got.sequence(index), want.sequence(index)
            assert a.keys() == b.keys()
            for field in a:
                np.testing.assert_array_equal(a[field], b[field])


def arcee_rows(count: int, double_bos: bool = True, chat: bool = True) -> list[dict]:
    """Rows in the released arcee-ai/LLama-405B-Logits shape: chat-formatted token ids starting with a
    doubled BOS, top-k ids and raw logits per position."""
    from transformers import AutoTokenizer

    from posttrain.hf.chat_templates import resolve_chat_template

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    tok.chat_template = resolve_chat_template("llama-3.1", ROOT).text
    rows = []
    for line in TRAIN.read_text().splitlines()[:count]:
        messages = json.loads(line)["messages"]
        ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] if chat else \
            [tok.bos_token_id] + tok(messages[0]["content"], add_special_tokens=False)["input_ids"]
        ids = [tok.bos_token_id] + list(ids) if double_bos else list(ids)
        logits = torch.randn(len(ids), 1024, generator=torch.Generator().manual_seed(len(rows)))
        values, top = logits.topk(8, -1)
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "token_ids": top.tolist(),
                     "top_values": values.tolist()})
    return rows


def write_arcee_parquet(path, rows) -> None:
    """list<int32> ids, list<list<int32>> top-k ids, list<list<float32>> values: the real column types."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8())),
                        ("token_ids", pa.list_(pa.list_(pa.int32()))),
                        ("top_values", pa.list_(pa.list_(pa.float32())))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


@pytest.mark.slow
def test_arcee_layout_with_raw_logits_trains_with_the_renormalised_loss(tmp_path, capsys):
    data = tmp_path / "logits.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arcee_rows(16, double_bos=False, chat=False)))
    stage = {"kind": "distill", "model": "base", "logits_dataset": {"path": str(data), "vocab_size": 1024},
             "assistant_only": False, "training": {"max_steps": 2, "per_device_train_batch_size": 4}}
    recipe = recipe_with(tmp_path, {"distill": stage})
    assert main(["validate", str(recipe)]) == 2
    assert "only loss: renormalized is valid for them" in capsys.readouterr().err
    stage["loss"] = "renormalized"
    result = posttrain.run(recipe_with(tmp_path, {"distill": stage}))
    assert result.metrics("distill")["steps"] == 2 and result.metrics("distill")["loss_type"] == "renormalized"


@pytest.mark.slow
def test_arcee_layout_rows_are_cut_at_max_length_double_bos_collapsed_and_assistant_tokens_found(tmp_path):
    from posttrain.kinds.distill.data import LengthLimited, LogitsDatasetSequences
    from posttrain.kinds.distill.stage import LogitsDataset
    from posttrain.hf.tokenizer_setup import attach_chat_template
    from transformers import AutoTokenizer

    rows = arcee_rows(12)
    data = tmp_path / "logits.parquet"
    write_arcee_parquet(data, rows)
    lengths = [len(r["input_ids"]) - 1 for r in rows]  # after the doubled BOS is cut to one
    max_length = max(lengths) - 1
    stage = {"kind": "distill", "model": "base", "loss": "renormalized", "max_length": max_length,
             "logits_dataset": {"path": str(data), "vocab_size": 1024},
             "training": {"max_steps": 2, "per_device_train_batch_size": 4}}
    metrics = posttrain.run(recipe_with(tmp_path, {"distill": stage})).metrics("distill")
    assert metrics["truncated_sequences"] == sum(n > max_length for n in lengths) > 0
    assert metrics["double_bos_rows"] == 12 and metrics["sequences"] == 12

    folder = tmp_path / "tok"
    attach_chat_template(TINY_MODEL, folder, "llama-3.1", folder)
    tok = AutoTokenizer.from_pretrained(folder)
    sequences = LengthLimited(LogitsDatasetSequences(LogitsDataset(path=str(data), vocab_size=1024), tmp_path,
                                                     tok, assistant_only=True), max_length, "truncate")
    item = sequences[0]
    assert item["input_ids"][0] == tok.bos_token_id and item["input_ids"][1] != tok.bos_token_id
    assert len(item["input_ids"]) == len(item["target_ids"]) == min(lengths[0], max_length)
    answer = json.loads(TRAIN.read_text().splitlines()[0])["messages"][-1]["content"]
    full = LogitsDatasetSequences(LogitsDataset(path=str(data), vocab_size=1024), tmp_path, tok, assistant_only=True)[0]
    assert tok.decode(full["input_ids"][full["loss_mask"]]) == answer + "<|eot_id|>"


@pytest.mark.slow
def test_arcee_rows_not_starting_with_the_students_bos_are_refused(tmp_path, capsys):
    rows = arcee_rows(4, double_bos=False)
    for row in rows:
        row["input_ids"][0] = 5
    data = tmp_path / "logits.parquet"
    write_arcee_parquet(data, rows)
    stage = {"kind": "distill", "model": "base", "loss": "renormalized",
             "logits_dataset": {"path": str(data), "vocab_size": 1024}, "training": {"max_steps": 1}}
    assert main(["run", str(recipe_with(tmp_path, {"distill": stage}))]) != 0
    assert "row 1: starts with token 5, but the student's tokenizer starts every sequence with BOS 1008" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_python_api(tmp_path, registry_dir):
    path = posttrain.capture_logits(teacher=TINY_MODEL, data=TRAIN, chat_template="llama-3.1", k=8)
    assert (path / "index.json").is_file()
    student = posttrain.distill(model=TINY_MODEL, teacher_logits=path, chat_template="llama-3.1",
                                max_steps=2, per_device_train_batch_size=8)
    assert (student / "model.safetensors").is_file()


@pytest.mark.slow
def test_packed_rows_give_the_same_loss_as_separate_sequences(tmp_path):
    """Block-diagonal attention from restarting position ids: packing changes nothing but the batching."""
    from transformers import AutoModelForCausalLM

    from posttrain.kd.losses import distill_loss
    from posttrain.kinds.distill.data import PackedSequences, ShardSequences, collate

    result = posttrain.run(recipe_with(tmp_path, {"capture": capture(k=16)}))
    data = ShardSequences(result.path("capture"))
    model = AutoModelForCausalLM.from_pretrained(result.path("base")).eval()
    subset = [data[i] for i in range(6)]

    def loss_of(batch):
        core = model.get_decoder()
        with torch.no_grad():
            if "position_ids" in batch:
                hidden = core(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              use_cache=False).last_hidden_state
            else:
                hidden = core(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            trained = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["valid_index"])
            return distill_loss(trained, model.get_output_embeddings(), batch["target_ids"], batch["target_values"],
                                batch["next_tokens"], alpha=0.5)[0], int(batch["valid"].sum())

    separate, n_separate = loss_of(collate(subset, 0, True))
    packed_data = PackedSequences(subset, max_length=160)
    assert len(packed_data) < len(subset)  # several sequences per row
    packed, n_packed = loss_of(collate([packed_data[i] for i in range(len(packed_data))], 0, True))
    assert n_packed == n_separate
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_packed_distillation_trains(tmp_path):
    stages = {"capture": capture(k=16),
              "distill": {"kind": "distill", "model": "base", "teacher_logits": "capture", "packing": True,
                          "max_length": 256, "alpha": 0.5, "training": {"max_steps": 3, **TRAIN_ARGS}}}
    metrics = posttrain.run(recipe_with(tmp_path, stages)).metrics("distill")
    assert metrics["steps"] == 3 and metrics["packed_rows"] < metrics["sequences"]


@pytest.mark.slow
def test_sampled_targets_are_an_empirical_distribution_that_trains(tmp_path):
    from posttrain.kd.shards import read_index, read_shard

    stages = {"capture": capture(k=12, mode="sampled"),
              "distill": {"kind": "distill", "model": "base", "teacher_logits": "capture",
                          "training": {"max_steps": 2, **TRAIN_ARGS}}}
    result = posttrain.run(recipe_with(tmp_path, stages))
    folder = result.path("capture")
    index = read_index(folder)
    assert index["mode"] == "sampled" and index["samples"] == 12
    item = read_shard(folder / index["shards"][0]["file"]).sequence(0)
    mass = np.exp(item["target_values"].astype(np.float64)).sum(-1)
    np.testing.assert_allclose(mass, 1.0, atol=12 * np.exp(-15) + 1e-3)  # counts / 12 sum to one
    weights = np.exp(item["target_values"])
    assert np.allclose(np.round(weights[weights > 1e-3] * 12), weights[weights > 1e-3] * 12, atol=1e-2)
    assert result.metrics("distill")["steps"] == 2


def confident_teacher(folder):
    """The tiny model with its output layer scaled up: a peaked teacher (top-1 p > 0.985 at most positions)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_MODEL / name, folder / name)
    return folder


@pytest.mark.slow
def test_q10_capture_of_a_confident_teacher_keeps_its_tail_and_sums_to_at_most_one(tmp_path):
    from posttrain.kd.losses import sparse_kd
    from posttrain.kd.shards import read_index, read_shard

    teacher = confident_teacher(tmp_path / "peaked")
    body = {"name": "kd", "base": {"model": str(teacher), "chat_template": "llama-3.1"},
            "stages": {"capture": capture(k=16, encoding="q10")}}
    result = posttrain.run(write_recipe(tmp_path, yaml.safe_dump(body, sort_keys=False)))
    metrics = result.metrics("capture")
    assert metrics["share_of_positions_with_codes_summing_above_1"] > 0.05  # what the codes alone would do
    folder = result.path("capture")
    shard = read_shard(folder / read_index(folder)["shards"][0]["file"])
    item = shard.sequence(0)
    full = teacher_logp(result.path("base"), item["input_ids"].tolist())
    ids = torch.from_numpy(item["target_ids"])
    exact_tail = torch.logsumexp(full.scatter(-1, ids, float("-inf")), -1)
    torch.testing.assert_close(torch.from_numpy(item["target_tail"]), exact_tail, rtol=1e-4, atol=1e-4)
    # The teacher distilled into itself through its q10 targets: one distribution, so ~0 and never negative.
    own = sparse_kd(full * 1.0, ids, torch.from_numpy(item["target_values"]),
                    teacher_tail=torch.from_numpy(item["target_tail"]))
    assert torch.isfinite(own).all() and own.max() < 2e-3 and own.min() > -1e-6


@pytest.mark.slow
def test_gradient_accumulation_weighs_tokens_not_micro_batches(tmp_path):
    """GA = 2 over two sequences of unequal length gives the gradient of one batch holding both."""
    from safetensors.torch import load_file

    data = tmp_path / "two.jsonl"
    answers = ["7", "seven hundred and twenty three, because three times two hundred and forty one is that"]
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "What is 3 times 241?"},
                                                     {"role": "assistant", "content": a}]}) + "\n" for a in answers))
    sgd = {"optim": "sgd", "learning_rate": 1.0, "max_grad_norm": 0.0, "lr_scheduler_type": "constant",
           "weight_decay": 0.0, "max_steps": 1}
    grab = capture(teacher="peaked", k=16)
    grab["data"] = {"sources": [{"path": str(data)}], "max_length": 512}
    teacher = confident_teacher(tmp_path / "peaked-teacher")
    deltas = {}
    base = load_file(TINY_MODEL / "model.safetensors")
    for name, batch, accumulation in (("one_batch", 2, 1), ("accumulated", 1, 2)):
        stages = {"capture": grab, "distill": {"kind": "distill", "model": "base", "teacher_logits": "capture",
                  "training": {**sgd, "per_device_train_batch_size": batch,
                               "gradient_accumulation_steps": accumulation}}}
        body = {"name": name, "base": {"model": str(TINY_MODEL), "chat_template": "llama-3.1"},
                "models": {"peaked": {"model": str(teacher), "chat_template": "llama-3.1"}}, "stages": stages}
        folder = tmp_path / name
        folder.mkdir()
        result = posttrain.run(write_recipe(folder, yaml.safe_dump(body, sort_keys=False)))
        trained = load_file(result.path("distill") / "model.safetensors")
        deltas[name] = {key: trained[key] - base[key] for key in base}
    assert deltas["one_batch"]["lm_head.weight"].abs().max() > 1e-3  # a real gradient, not a no-op
    for key in base:
        torch.testing.assert_close(deltas["accumulated"][key], deltas["one_batch"][key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_shards_are_bounded_in_bytes(tmp_path):
    from posttrain.kinds.capture_logits.run import shard_groups, stored_bytes_per_position

    assert shard_groups([10, 10, 10, 50, 10], max_sequences=100, max_bytes=250, per_position=10) == \
        [(0, 2), (2, 3), (3, 4), (4, 5)]  # a 500-byte sequence gets a shard of its own
    assert shard_groups([1] * 5, max_sequences=2, max_bytes=10 ** 9, per_position=1) == [(0, 2), (2, 4), (4, 5)]
    budget = 40_000
    result = posttrain.run(recipe_with(tmp_path, {"capture": capture(k=16, shard_sequences=1000, shard_bytes=budget)}))
    files = sorted(result.path("capture").glob("shard-*.safetensors"))
    per_position = stored_bytes_per_position(1024, 16, "fp16")
    assert len(files) > 3 and result.metrics("capture")["shards"] == len(files)
    assert all(f.stat().st_size <= budget + 96 * per_position + 4096 for f in files)  # + one sequence + header


@pytest.mark.slow
def test_vllm_backend_run_against_a_stand_in_vllm_built_from_the_hf_model_matches_the_hf_backend(tmp_path, monkeypatch):
    """The capture stage's `backend: vllm` path, end to end against tests/fakes/vllm (vLLM's offline API
    answered by the transformers model): same shards as the HF backend, ids identical, values within
    fp16 storage. The real vLLM against the real HF forward is bench/gpu_smoke.py's job."""
    import sys

    from posttrain.kd.shards import read_index, read_shard

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "fakes"))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    import vllm

    result = posttrain.run(recipe_with(tmp_path, {
        "hf": capture(k=16),
        "served": capture(k=16, backend="vllm", vllm={"tensor_parallel_size": 8, "gpu_memory_utilization": 0.8})}))
    assert vllm.created[-1]["tensor_parallel_size"] == 8 and vllm.created[-1]["max_logprobs"] == 16
    hf, served = result.path("hf"), result.path("served")
    assert [s["sequences"] for s in read_index(hf)["shards"]] == [s["sequences"] for s in read_index(served)["shards"]]
    compared = 0
    for item in read_index(hf)["shards"]:
        a, b = read_shard(hf / item["file"]), read_shard(served / item["file"])
        for i in range(a.num_sequences):
            x, y = a.sequence(i), b.sequence(i)
            np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
            last = len(x["input_ids"]) - 1  # no next token: vLLM gives no target there, and none is trained
            np.testing.assert_array_equal(x["target_ids"][:last], y["target_ids"][:last])
            # fp16 storage: one step is 1/128 for |log p| in [8, 16)
            np.testing.assert_allclose(x["target_values"][:last], y["target_values"][:last], atol=1 / 128)
            compared += last
    assert compared > 1000
    # A different teacher split over GPUs stores the same thing: it is not part of the key.
    again = posttrain.run(recipe_with(tmp_path, {"served": capture(k=16, backend="vllm",
                                                                   vllm={"tensor_parallel_size": 2})}))
    assert again.entries["served"].key == result.entries["served"].key
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]  # not monkeypatch.delitem: its undo would bring the stand-in back


def test_the_vllm_backend_refuses_what_vllm_cannot_give(tmp_path):
    from posttrain.core.errors import RecipeError
    from posttrain.recipe import load_recipe

    with pytest.raises(RecipeError, match="stages.c.temperature: vLLM's prompt log-probs are the teacher's own"):
        load_recipe(recipe_with(tmp_path, {"c": capture(backend="vllm", temperature=2.0)}))
    with pytest.raises(RecipeError, match="stages.c.mode: the vllm backend returns top-k log-probs"):
        load_recipe(recipe_with(tmp_path, {"c": capture(backend="vllm", mode="sampled")}))


@pytest.mark.slow
def test_compact_capture_with_mass_distills_with_no_extra_settings(tmp_path):
    from posttrain.kd.shards import read_index

    # The tiny random teacher is nearly uniform (its top 64 hold ~7% of the mass): a small share makes
    # the number of entries vary.
    stages = {"capture": capture(k=64, encoding="compact", mass=0.03),
              "distill": {"kind": "distill", "model": "base", "teacher_logits": "capture",
                          "training": {"max_steps": 1, **TRAIN_ARGS, "learning_rate": 1e-9}}}
    result = posttrain.run(recipe_with(tmp_path, stages))
    metrics = result.metrics("capture")
    index = read_index(result.path("capture"))
    assert index["encoding"] == "compact" and index["mass"] == 0.03 and index["compact"]["step"] == 1 / 26
    assert metrics["mean_entries_per_position"] < 64 and metrics["mean_abs_value_error"] < 0.0105
    (tmp_path / "fp16").mkdir()
    fp16 = posttrain.run(recipe_with(tmp_path / "fp16", {"capture": capture(k=64)})).metrics("capture")
    assert metrics["bytes_per_token"] < fp16["bytes_per_token"] / 2
    # Self-distillation from the compact targets starts at (almost) zero: ids, values, masks and the tail
    # (holding what mass left out) decode to the teacher's distribution at the right positions.
    assert result.metrics("distill")["kd_loss"][0]["value"] <= 1e-3


def test_a_batch_carries_only_the_trained_positions_targets_with_their_flat_indices():
    """The collator hands the loss the trained positions by index ([N] longs, [N, k] targets), so the
    device never resolves a boolean mask (a host-device sync each step)."""
    from posttrain.kinds.distill.data import collate

    def row(n, mask):
        return {"input_ids": np.arange(n, dtype=np.int64) + 10, "loss_mask": np.array(mask, dtype=bool),
                "target_ids": np.tile(np.arange(n)[:, None], (1, 2)), "target_values": np.zeros((n, 2), np.float32),
                "target_tail": np.full(n, -3.0, np.float32)}

    batch = collate([row(4, [0, 1, 1, 1]), row(3, [0, 0, 1])], pad_id=0, assistant_only=True)
    # row 0: positions 0..2 predict tokens 1..3 (all assistant); row 1: position 1 predicts token 2.
    assert batch["valid_index"].tolist() == [0, 1, 2, 4 + 1]
    assert batch["valid"].sum() == 4 and batch["target_ids"].shape == (4, 2) and batch["target_tail"].shape == (4,)
    assert batch["next_tokens"].tolist() == [11, 12, 13, 12]
    assert batch["target_ids"][:, 0].tolist() == [0, 1, 2, 1]


@pytest.mark.slow
def test_the_distill_loss_path_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """`.item()`, `float()`, `int()` or `bool()` of a tensor in posttrain's part of the student's forward
    and loss (each is a host-device sync on a GPU), counted during training: none. Trained positions are
    picked by indices the collator made, and the fused loss (kd/fused.py) leaves its parts on the device
    until a logging step. (transformers' SDPA mask builder still checks a padded batch's mask once per
    forward; packed batches and flash-attention take other paths.)"""
    import sys as system

    import posttrain.kinds.distill.run as distill_run

    calls = []

    def caller() -> str:
        return system._getframe(2).f_code.co_filename
    plain_install = distill_run.install_distill_forward

    def counting_install(model):
        plain_install(model)
        forward = model.forward

        def counted(*args, **kwargs):
            if kwargs.get("distill") is None:
                return forward(*args, **kwargs)
            originals = {name: getattr(torch.Tensor, name) for name in ("item", "__float__", "__int__", "__bool__")}
            for name, original in originals.items():
                monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _o=original: (calls.append((_n, caller())), _o(self, *a))[1])
            try:
                return forward(*args, **kwargs)
            finally:
                for name, original in originals.items():
                    monkeypatch.setattr(torch.Tensor, name, original)

        model.forward = counted

    monkeypatch.setattr(distill_run, "install_distill_forward", counting_install)
    stages = {"capture": capture(k=16),
              "distill": {"kind": "distill", "model": "base", "teacher_logits": "capture",
                          "training": {"max_steps": 3, **TRAIN_ARGS}}}
    result = posttrain.run(recipe_with(tmp_path, stages))
    assert result.metrics("distill")["steps"] == 3 and result.metrics("distill")["kd_loss"]
    assert calls, "the counter saw nothing: it no longer wraps the forward"
    ours = [(name, where) for name, where in calls if f"{os.sep}posttrain{os.sep}" in where
            and f"{os.sep}site-packages{os.sep}" not in where]
    assert [(name, where.rsplit(os.sep, 2)[-2] + "/" + where.rsplit(os.sep, 1)[-1]) for name, where in ours] == []


@pytest.mark.slow
def test_decoding_shards_in_dataloader_workers_trains_exactly_as_in_the_main_process(tmp_path):
    """On a GPU the stage decodes shards in worker processes; the batches and so the losses are the same."""
    losses = []
    for workers in (0, 2):
        stages = {"capture": capture(k=16, encoding="compact"),
                  "distill": {"kind": "distill", "model": "base", "teacher_logits": "capture",
                              "training": {"max_steps": 3, **TRAIN_ARGS, "dataloader_num_workers": workers}}}
        folder = tmp_path / f"workers{workers}"
        folder.mkdir()
        result = posttrain.run(recipe_with(folder, stages), registry=folder / "registry")
        losses.append([p["value"] for p in result.metrics("distill")["kd_loss"]])
    assert len(losses[0]) == 3 and losses[0] == losses[1]
