"""Sharded training on CPU processes (gloo): FSDP2 really shards (DTensor parameters, half the numbers
per rank), matches one process with the same global batch for sft, dpo (both reference modes) and
distill, resumes from sharded checkpoints, writes Hub-style entries in the storage dtype; LoRA and
distill run under DDP; engines that would silently fall back to DDP on a CPU are refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import posttrain
from conftest import ROOT, TINY_MODEL, cli, run_and_kill_at_checkpoint, write_recipe

FSDP_CPU = ROOT / "configs" / "accelerate" / "fsdp_cpu.yaml"
SFT_DATA = ROOT / "data" / "sft" / "tiny_chat_train.jsonl"
DPO_DATA = ROOT / "data" / "dpo" / "tiny_prefs_train.jsonl"
LOGITS = ROOT / "data" / "distill" / "tiny_teacher_logits.jsonl"
FSDP = ("--launcher", "accelerate", "--accelerate-config", str(FSDP_CPU))


def steps(n: int, batch: int, lr: float) -> dict:
    return {"max_steps": n, "per_device_train_batch_size": batch, "learning_rate": lr,
            "lr_scheduler_type": "constant", "report_to": []}


def every_trainer(folder, name: str, batch: int) -> Path:
    """sft -> dpo (precomputed reference), dpo (reference model alongside), distill; a bf16 base."""
    stages = {
        "sft": {"kind": "sft", "data": {"sources": [{"path": str(SFT_DATA)}], "max_length": 96},
                "training": steps(4, batch, 3e-3)},
        "dpo": {"kind": "dpo", "model": "sft", "precompute_ref_log_probs": True,
                "data": {"sources": [{"path": str(DPO_DATA)}], "max_length": 96}, "training": steps(3, batch, 1e-3)},
        "dpo_ref": {"kind": "dpo", "model": "sft", "beta": 0.3,
                    "data": {"sources": [{"path": str(DPO_DATA)}], "max_length": 96}, "training": steps(3, batch, 1e-3)},
        "distill": {"kind": "distill", "model": "sft", "loss": "renormalized", "alpha": 0.5,
                    "logits_dataset": {"path": str(LOGITS), "vocab_size": 1024}, "assistant_only": False,
                    "max_length": 96, "training": steps(3, batch, 1e-3)},
    }
    body = {"name": name, "base": {"model": str(TINY_MODEL), "chat_template": "llama-3.1", "dtype": "bfloat16"},
            "seed": 7, "stages": stages}
    return write_recipe(folder, yaml.safe_dump(body, sort_keys=False), name=f"{name}.yaml")


def manifest(registry_dir, ref: str) -> dict:
    registry = posttrain.Registry(registry_dir)
    return json.loads((registry_dir / "entries" / registry.get_ref(ref) / "manifest.json").read_text())


def losses(metrics: dict) -> list[float]:
    return [p["value"] for p in metrics["loss"]]


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_shards_and_matches_one_process(tmp_path, registry_dir):
    launched = cli("run", str(every_trainer(tmp_path, "two", batch=2)), *FSDP, timeout=900)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    single = posttrain.run(every_trainer(tmp_path, "one", batch=4))
    for stage in ("sft", "dpo", "dpo_ref", "distill"):
        two = manifest(registry_dir, f"two/{stage}")
        layout = two["metrics"]["sharding"]
        # Every parameter a DTensor, rank 0 holding half of the numbers: sharded, not replicated.
        assert layout["engine"] == "fsdp2" and layout["processes"] == 2, layout
        assert layout["dtensor_parameters"] == layout["parameters"] > 0
        assert layout["local_numel"] * 2 == layout["full_numel"]
        assert single.metrics(stage)["sharding"]["engine"] == "none"
        assert losses(two["metrics"]) == pytest.approx(losses(single.metrics(stage)), abs=1e-4), stage
        # One Hub-style folder in the base's storage dtype, laid out as a single-process entry.
        folder = registry_dir / "entries" / two["key"]
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in single.path(stage).iterdir())
        assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
        sharded, alone = load_file(folder / "model.safetensors"), load_file(single.path(stage) / "model.safetensors")
        assert {t.dtype for t in sharded.values()} == {torch.bfloat16} and sharded.keys() == alone.keys()
    assert not list(registry_dir.glob("entries/*/optimizer*")) and not list(registry_dir.glob("entries/*/*.bin"))
    assert cli("verify", "--registry", str(registry_dir)).returncode == 0


def sft_only(folder, steps_total: int = 16) -> Path:
    body = {"name": "resume", "base": {"model": str(TINY_MODEL), "chat_template": "llama-3.1"}, "seed": 3,
            "stages": {"sft": {"kind": "sft", "save_steps": 4,
                               "data": {"sources": [{"path": str(SFT_DATA)}], "max_length": 96},
                               "training": steps(steps_total, 2, 3e-3)}}}
    return write_recipe(folder, yaml.safe_dump(body, sort_keys=False))


@pytest.mark.slow
def test_a_killed_sharded_run_resumes_from_its_sharded_checkpoint_to_the_same_weights(tmp_path, monkeypatch):
    reference_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    reference_dir.mkdir(), killed_dir.mkdir()
    monkeypatch.setenv("POSTTRAIN_REGISTRY", str(reference_dir / "registry"))
    whole = cli("run", str(sft_only(reference_dir)), *FSDP, timeout=600)
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-2000:]

    registry = killed_dir / "registry"
    monkeypatch.setenv("POSTTRAIN_REGISTRY", str(registry))
    recipe = sft_only(killed_dir)
    run_and_kill_at_checkpoint(recipe, registry, step=4, extra=FSDP)  # every process of the launch
    checkpoint = next(registry.glob("work/*/checkpoints/checkpoint-4"))
    assert list(checkpoint.glob("pytorch_model_fsdp_0/*.distcp")), sorted(p.name for p in checkpoint.iterdir())
    resumed = cli("run", str(recipe), *FSDP, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]

    a, b = manifest(reference_dir / "registry", "resume/sft"), manifest(registry, "resume/sft")
    assert b["metrics"]["resumed_from_step"] in (4, 8, 12) and b["metrics"]["sharding"]["engine"] == "fsdp2"
    assert losses(b["metrics"])[-1] == pytest.approx(losses(a["metrics"])[-1], abs=1e-4)
    ours = load_file(registry / "entries" / b["key"] / "model.safetensors")
    theirs = load_file(reference_dir / "registry" / "entries" / a["key"] / "model.safetensors")
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5)

    # The same checkpoint resumed by a different launch would not load: said, not attempted.
    run_and_kill_at_checkpoint(sft_only(killed_dir, steps_total=17), registry, step=4, extra=FSDP)
    alone = cli("run", str(sft_only(killed_dir, steps_total=17)))
    assert alone.returncode != 0 and "written by 2 process(es) and this run has 1" in alone.stderr
    assert "Traceback" not in alone.stderr


def lora_and_distill(folder, name: str, batch: int) -> Path:
    stages = {"sft": {"kind": "sft", "data": {"sources": [{"path": str(SFT_DATA)}], "max_length": 96},
                      "lora": {"r": 8, "alpha": 16}, "training": steps(4, batch, 3e-3)},
              "distill": {"kind": "distill", "model": "base", "loss": "renormalized", "alpha": 0.5,
                          "logits_dataset": {"path": str(LOGITS), "vocab_size": 1024}, "assistant_only": False,
                          "max_length": 96, "training": steps(3, batch, 1e-3)}}
    body = {"name": name, "base": {"model": str(TINY_MODEL), "chat_template": "llama-3.1"}, "seed": 5,
            "stages": stages}
    return write_recipe(folder, yaml.safe_dump(body, sort_keys=False), name=f"{name}.yaml")


@pytest.mark.slow
def test_lora_and_distill_under_ddp_match_one_process(tmp_path, registry_dir):
    launched = cli("run", str(lora_and_distill(tmp_path, "two", 2)), "--launcher", "torchrun", "--nproc", "2",
                   timeout=600)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    single = posttrain.run(lora_and_distill(tmp_path, "one", 4))
    for stage in ("sft", "distill"):
        two = manifest(registry_dir, f"two/{stage}")
        assert two["metrics"]["sharding"]["engine"] == "ddp"
        assert losses(two["metrics"]) == pytest.approx(losses(single.metrics(stage)), abs=1e-4), stage
    folder = registry_dir / "entries" / manifest(registry_dir, "two/sft")["key"]
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    merged = load_file(folder / "model.safetensors")
    assert not any("lora" in name for name in merged)  # merged into a plain folder


@pytest.mark.slow
@pytest.mark.parametrize("asked_in", ["accelerate config", "stage training"])
def test_fsdp1_on_cpu_processes_is_refused_instead_of_running_as_ddp(tmp_path, registry_dir, asked_in):
    recipe = sft_only(tmp_path)
    if asked_in == "accelerate config":
        config = yaml.safe_load(FSDP_CPU.read_text())
        config["fsdp_config"]["fsdp_version"] = 1
        path = tmp_path / "accelerate.yaml"
        path.write_text(yaml.safe_dump(config))
        launch = ("--launcher", "accelerate", "--accelerate-config", str(path))
    else:
        body = yaml.safe_load(recipe.read_text())
        body["stages"]["sft"]["training"].update(fsdp="full_shard", fsdp_config={"fsdp_version": 1})
        recipe.write_text(yaml.safe_dump(body))
        launch = ("--launcher", "torchrun", "--nproc", "2")
    failed = cli("run", str(recipe), *launch, timeout=300)
    assert failed.returncode != 0
    assert "FSDP1 is asked for" in failed.stderr and "would silently run plain DDP" in failed.stderr, \
        failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr
    built = [json.loads(m.read_text())["kind"] for m in registry_dir.glob("entries/*/manifest.json")]
    assert "sft" not in built


def test_plan_estimates_per_device_by_engine():
    """FSDP divides weights, grads and optimizer state by the processes; DDP keeps a whole copy in
    each; activations and logits are per device either way; distill holds one chunk of logits."""
    from posttrain.planning.memory import KNOWN_ARCHITECTURES, Architecture, Launch, training_bytes
    from posttrain.kinds import get_stage

    raw = KNOWN_ARCHITECTURES["PrimeIntellect/INTELLECT-1"]
    arch = Architecture(raw["num_hidden_layers"], raw["hidden_size"], raw["intermediate_size"],
                        raw["num_attention_heads"], raw["num_key_value_heads"], raw["vocab_size"], False)
    sft = get_stage("sft").Config.model_validate({"kind": "sft", "data": {"sources": [{"path": "x.jsonl"}],
                                                  "max_length": 4096}, "training": {"per_device_train_batch_size": 1}})
    fsdp, ddp = (training_bytes("sft", sft, arch, Launch(8, engine, True)) for engine in ("fsdp", "ddp"))
    assert fsdp["weights, grads, AdamW"] * 8 == pytest.approx(ddp["weights, grads, AdamW"])
    assert ddp["weights, grads, AdamW"] == pytest.approx(16 * arch.parameters)  # fp32 masters + AdamW
    # A replicated 10B peaks in AdamW's step (its temporaries the size of the params), not in backward.
    assert set(ddp) == {"weights, grads, AdamW", "optimizer step"}
    four = training_bytes("sft", sft, arch, Launch(4, "fsdp", True))
    assert four["weights, grads, AdamW"] == pytest.approx(2 * fsdp["weights, grads, AdamW"])
    assert fsdp["activations"] == four["activations"] and fsdp["logits"] == four["logits"]
    assert fsdp["bf16 working copy"] < 2 * arch.parameters / 4  # a layer or two gathered, not all

    def distill(length: int) -> dict:
        config = get_stage("distill").Config.model_validate({"kind": "distill", "teacher_logits_path": "x",
                                                             "max_length": length,
                                                             "training": {"per_device_train_batch_size": 1}})
        return training_bytes("distill", config, arch, Launch(8, "fsdp", True))

    assert distill(4096)["logits (one chunk)"] == distill(8192)["logits (one chunk)"]
    assert distill(8192)["activations"] == pytest.approx(2 * distill(4096)["activations"])


def test_every_built_in_kind_has_an_estimate_that_plan_can_print():
    """`plan` asks `estimate` for every stage; a kind whose branch fails would end `plan` in a traceback
    (the capture estimate once read a sequence length only the training branch had set)."""
    from posttrain.planning.memory import KNOWN_ARCHITECTURES, Architecture, estimate
    from posttrain.kinds import get_stage

    raw = KNOWN_ARCHITECTURES["PrimeIntellect/INTELLECT-1"]
    arch = Architecture(raw["num_hidden_layers"], raw["hidden_size"], raw["intermediate_size"],
                        raw["num_attention_heads"], raw["num_key_value_heads"], raw["vocab_size"], False)
    data = {"sources": [{"path": "x.jsonl"}], "max_length": 4096}
    configs = {
        "capture_logits": {"kind": "capture_logits", "data": data, "batch_size": 2},
        "distill": {"kind": "distill", "teacher_logits_path": "x"},
        "sft": {"kind": "sft", "data": data},
        "dpo": {"kind": "dpo", "data": data},
    }
    for kind, body in configs.items():
        line = estimate(kind, get_stage(kind).Config.model_validate(body), arch, 1)
        assert line.startswith("~") and "GiB" in line, (kind, line)
    assert "4096" in estimate("sft", get_stage("sft").Config.model_validate(configs["sft"]), arch, 1)
