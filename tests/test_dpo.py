"""The DPO stage: preferences are learned, the reference is right and lean, SFT(LoRA) -> DPO chains."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

import posttrain
from conftest import ROOT, TINY_MODEL, run_and_kill_at_checkpoint, write_recipe
from posttrain.cli import main
from posttrain.data.preferences import to_preference
from posttrain.data.formats import BadRow

PREFS = ROOT / "data" / "dpo" / "tiny_prefs_train.jsonl"
HELDOUT = ROOT / "data" / "dpo" / "tiny_prefs_heldout.jsonl"
SFT_DATA = ROOT / "data" / "sft" / "tiny_chat_train.jsonl"


def dpo_recipe(folder, steps=20, **stage):
    body = {"name": "dpotest", "base": {"model": str(TINY_MODEL), "chat_template": "llama-3.1"},
            "stages": {"dpo": {"kind": "dpo", "beta": 0.1, **stage,
                               "data": {"sources": [{"path": str(PREFS)}], "test_size": 16, "max_length": 96},
                               "training": {"max_steps": steps, "per_device_train_batch_size": 8,
                                            "learning_rate": 1e-3, "lr_scheduler_type": "constant"}}}}
    return write_recipe(folder, yaml.safe_dump(body, sort_keys=False))


def sequence_logp(model, tokenizer, prompt, completion) -> float:
    """log p(completion | prompt), computed directly with the model (independent of trl)."""
    from posttrain.data.tokens import chat_token_ids

    prompt_ids = chat_token_ids(tokenizer, prompt, add_generation_prompt=True)
    full = chat_token_ids(tokenizer, prompt + completion)
    assert full[: len(prompt_ids)] == prompt_ids
    ids = torch.tensor([full])
    with torch.no_grad():
        logps = model(ids).logits[0, :-1].float().log_softmax(-1)
    token_logps = logps.gather(1, ids[0, 1:, None])[:, 0]
    return float(token_logps[len(prompt_ids) - 1:].sum())


def heldout_margin(path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines()]
    return sum(sequence_logp(model, tok, r["prompt"], r["chosen"]) - sequence_logp(model, tok, r["prompt"], r["rejected"])
               for r in rows) / len(rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import os

    folder = tmp_path_factory.mktemp("dpo")
    os.environ["POSTTRAIN_REGISTRY"] = str(folder / "registry")
    try:
        return posttrain.run(dpo_recipe(folder))
    finally:
        del os.environ["POSTTRAIN_REGISTRY"]


@pytest.mark.slow
def test_preference_accuracy_and_margin_rise(trained):
    metrics = trained.metrics("dpo")
    margins = [p["value"] for p in metrics["rewards_margins"]]
    accuracies = [p["value"] for p in metrics["rewards_accuracies"]]
    assert len(margins) == 20
    assert sum(margins[-5:]) / 5 > sum(margins[:5]) / 5 + 0.5
    assert sum(accuracies[-5:]) / 5 > sum(accuracies[:5]) / 5
    assert sum(accuracies[-5:]) / 5 >= 0.9
    assert metrics["eval"]["rewards_accuracies"][-1]["value"] >= 0.9  # named like the training series
    assert metrics["reference"] == "policy input" and metrics["precomputed_reference"] is True


@pytest.mark.slow
def test_heldout_chosen_logp_rises_relative_to_rejected(trained):
    before, after = heldout_margin(trained.path("base")), heldout_margin(trained.path("dpo"))
    assert after > before + 1.0, (before, after)


@pytest.mark.slow
def test_stored_reference_logps_equal_an_independent_computation(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.sources import DataConfig
    from support.in_memory import load_preferences

    base = trained.path("base")
    model, tok = AutoModelForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)
    stored = json.loads((trained.path("dpo") / "reference_logps.json").read_text())
    # Rebuild the stage's train split as documented: the mixture's order, less the rows datasets'
    # train_test_split(test_size=16, seed=42) holds out.
    import datasets

    rows, _ = load_preferences(DataConfig(sources=[{"path": str(PREFS)}]), ROOT, seed=42)
    held = set(datasets.Dataset.from_dict({"i": list(range(len(rows)))}).train_test_split(test_size=16, seed=42)["test"]["i"])
    train = [row for i, row in enumerate(rows) if i not in held]
    assert len(stored) == len(train)
    for row, ref in list(zip(train, stored))[:4]:
        assert ref["ref_chosen_logps"] == pytest.approx(sequence_logp(model, tok, row["prompt"], row["chosen"]), abs=1e-3)
        assert ref["ref_rejected_logps"] == pytest.approx(sequence_logp(model, tok, row["prompt"], row["rejected"]), abs=1e-3)


@pytest.mark.slow
def test_sft_lora_then_dpo_runs_with_no_manual_step(tmp_path):
    recipe = dpo_recipe(tmp_path, steps=4, model="sft", lora={"r": 4, "alpha": 8})
    body = yaml.safe_load(recipe.read_text())
    body["stages"] = {"sft": {"kind": "sft", "lora": {"r": 8, "alpha": 16},
                              "data": {"sources": [{"path": str(SFT_DATA), "max_samples": 64}], "max_length": 96},
                              "training": {"max_steps": 4, "per_device_train_batch_size": 8}},
                      **body["stages"]}
    recipe.write_text(yaml.safe_dump(body, sort_keys=False))
    result = posttrain.run(recipe)
    assert result.ran == ["base", "sft.data", "sft", "dpo.data", "dpo"]
    metrics = result.metrics("dpo")
    assert metrics["reference"] == "adapter-disabled policy" and metrics["lora"] is True
    assert (result.path("dpo") / "adapter" / "adapter_config.json").is_file()
    manifest = json.loads((result.path("dpo") / "manifest.json").read_text())
    assert manifest["inputs"]["model"] == result.entries["sft"].key
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result.path("dpo"))


@pytest.mark.slow
def test_named_reference_model_is_used(tmp_path):
    recipe = dpo_recipe(tmp_path, steps=2, ref_model="base", model="base", precompute_ref_log_probs=False)
    result = posttrain.run(recipe)
    assert result.metrics("dpo")["reference"] == "ref_model input"
    assert json.loads((result.path("dpo") / "manifest.json").read_text())["inputs"]["ref_model"] == \
        result.entries["base"].key


@pytest.mark.slow
def test_python_api(tmp_path, registry_dir):
    path = posttrain.dpo(model=TINY_MODEL, data=PREFS, chat_template="llama-3.1", beta=0.2, max_steps=2,
                         per_device_train_batch_size=8)
    assert path.parent == registry_dir / "entries"
    assert json.loads((path / "manifest.json").read_text())["config"]["beta"] == 0.2


def test_dpo_recipe_errors(tmp_path, capsys):
    recipe = dpo_recipe(tmp_path, loss_type="sigmoidd", label_smoothing=0.7)
    body = yaml.safe_load(recipe.read_text())
    body["stages"]["dpo"]["training"]["beta"] = 0.3
    body["stages"]["dpo"]["beta"] = 0
    recipe.write_text(yaml.safe_dump(body, sort_keys=False))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "stages.dpo.loss_type: unknown DPO loss type 'sigmoidd'" in err
    assert "stages.dpo.label_smoothing: must be less than 0.5" in err
    assert "stages.dpo.beta: must be greater than 0" in err


PROMPT = [{"role": "user", "content": "Hi?"}]
ANSWER_A, ANSWER_B = [{"role": "assistant", "content": "Hello."}], [{"role": "assistant", "content": "Go away."}]


def test_preference_shapes_normalise_to_the_same_row():
    strings = to_preference({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."})
    lists = to_preference({"prompt": PROMPT, "chosen": ANSWER_A, "rejected": ANSWER_B})
    full = to_preference({"chosen": PROMPT + ANSWER_A, "rejected": PROMPT + ANSWER_B})
    full_with_prompt = to_preference({"prompt": "Hi?", "chosen": PROMPT + ANSWER_A, "rejected": PROMPT + ANSWER_B})
    assert strings == lists == full == full_with_prompt == {"prompt": PROMPT, "chosen": ANSWER_A, "rejected": ANSWER_B}


BAD_PAIRS = {
    "identical": ({"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}, "chosen", "identical to rejected"),
    "empty chosen": ({"prompt": "Hi?", "chosen": " ", "rejected": "x"}, "chosen", "chosen is empty"),
    "empty rejected list": ({"prompt": "Hi?", "chosen": "x", "rejected": []}, "rejected", "rejected is empty"),
    "missing rejected": ({"prompt": "Hi?", "chosen": "x"}, "rejected", "missing field 'rejected'"),
    "missing prompt": ({"chosen": "x", "rejected": "y"}, "prompt", "missing field 'prompt'"),
    "prompts differ": ({"chosen": PROMPT + ANSWER_A, "rejected": [{"role": "user", "content": "Yo?"}] + ANSWER_B},
                       "rejected.0", "different prompts"),
    "answer not by assistant": ({"prompt": "Hi?", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"},
                                "chosen", "must end with an assistant answer"),
}


@pytest.mark.parametrize("case", sorted(BAD_PAIRS))
def test_bad_preference_rows(case, tmp_path):
    row, field, message = BAD_PAIRS[case]
    with pytest.raises(BadRow) as err:
        to_preference(row)
    assert err.value.field == field and message in str(err.value)
    # Through the data layer, the file and row are named too.
    from posttrain.data.sources import DataConfig
    from support.in_memory import load_preferences
    from posttrain.core.errors import UserError

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "ok?", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=f"p.jsonl: row 2: field {field}: "):
        load_preferences(DataConfig(sources=[{"path": str(data)}]), tmp_path, 0)


@pytest.mark.slow
def test_killed_dpo_resumes_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    reference_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    reference_dir.mkdir(), killed_dir.mkdir()
    monkeypatch.setenv("POSTTRAIN_REGISTRY", str(reference_dir / "registry"))
    reference = posttrain.run(dpo_recipe(reference_dir, steps=12, save_steps=4))

    registry = killed_dir / "registry"
    monkeypatch.setenv("POSTTRAIN_REGISTRY", str(registry))
    recipe = dpo_recipe(killed_dir, steps=12, save_steps=4)
    run_and_kill_at_checkpoint(recipe, registry, step=8)

    resumed = posttrain.run(recipe)
    assert resumed.ran == ["dpo"] and resumed.metrics("dpo")["resumed_from_step"] in (4, 8)  # 8, or 4 if checkpoint-8 was cut short
    ref_margin = reference.metrics("dpo")["rewards_margins"][-1]["value"]
    assert resumed.metrics("dpo")["rewards_margins"][-1]["value"] == pytest.approx(ref_margin, rel=1e-4, abs=1e-5)
    a = load_file(reference.path("dpo") / "model.safetensors")
    b = load_file(resumed.path("dpo") / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_padding_free_pairs_give_the_padded_log_probs_and_gradients():
    """The decoder over one packed row (position ids restarting per sequence, SDPA, no attention mask)
    gives every sequence the log-probs and the gradients it gets padded, through trl's own fused head."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    from posttrain.kinds.dpo.packed_pairs import install_packed_backbone, packed_collator

    torch.manual_seed(0)
    pairs = [{"prompt_ids": [1, 5, 9, 4], "chosen_ids": [7, 3, 2], "rejected_ids": [8]},
             {"prompt_ids": [1, 6], "chosen_ids": [4, 4, 4, 4, 4, 2], "rejected_ids": [9, 2]},
             {"prompt_ids": [1, 3, 3, 3, 3, 3, 3], "chosen_ids": [2], "rejected_ids": [5, 6, 7, 2]}]
    padded = DataCollatorForPreference(pad_token_id=0)(pairs)
    packed = packed_collator(DataCollatorForPreference)(pad_token_id=0)(pairs)
    assert packed["packed_index"].numel() == int(padded["attention_mask"].sum()) < padded["input_ids"].numel()

    def logps_and_grads(batch, pack: bool):
        model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, attn_implementation="sdpa").float()
        if pack:
            install_packed_backbone(model)
        add_fused_lm_head(model)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
        token_logps = model(**inputs, labels=labels, fused_lm_head=True).log_probs
        sequence_logps = token_logps.sum(1)
        sequence_logps.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return sequence_logps.detach(), grads

    padded_logps, padded_grads = logps_and_grads(padded, pack=False)
    packed_logps, packed_grads = logps_and_grads(packed, pack=True)
    torch.testing.assert_close(packed_logps, padded_logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed_grads, padded_grads, rtol=1e-4, atol=1e-6)


def test_pair_padding_fraction_counts_the_pads_of_trls_batches():
    from posttrain.kinds.dpo.packed_pairs import padding_fraction

    # Batch 1: rows 4, 2, 3, 1 padded to 4 -> 16 slots, 10 real; batch 2: rows 5, 5 -> none.
    assert padding_fraction([(4, 2), (3, 1), (5, 5)], batch_size=2) == round(1 - 20 / 26, 4)
    assert padding_fraction([], batch_size=4) == 0.0


@pytest.mark.slow
def test_padding_free_dpo_trains_like_padded_dpo(tmp_path, registry_dir):
    """Same seed, same batches: the padding-free stage's reference log-probs, losses and rewards are the
    padded stage's, and both report what padding the data would cost."""
    runs = {}
    for mode in (False, True):
        folder = tmp_path / str(mode)
        folder.mkdir()
        runs[mode] = posttrain.run(dpo_recipe(folder, steps=4, padding_free=mode))
    padded, packed = runs[False].metrics("dpo"), runs[True].metrics("dpo")
    assert packed["padding_free"] is True and padded["padding_free"] is False
    assert packed["padding_fraction"] == padded["padding_fraction"] > 0  # similar-length pairs: ~3%
    for series in ("loss", "rewards_margins"):
        assert [p["value"] for p in packed[series]] == pytest.approx([p["value"] for p in padded[series]], abs=1e-4)
    references = [json.loads((runs[m].path("dpo") / "reference_logps.json").read_text()) for m in (False, True)]
    for before, after in zip(*references):
        assert after["ref_chosen_logps"] == pytest.approx(before["ref_chosen_logps"], abs=1e-4)
        assert after["ref_rejected_logps"] == pytest.approx(before["ref_rejected_logps"], abs=1e-4)
