"""Real artefacts: the real Llama-3 tokenizer (V = 128256), a Hub-style base folder, bf16 storage.

Every entry must be a folder a Llama-3.1-Instruct user cannot tell apart in use: EOS <|eot_id|> first
everywhere (even though the base's special_tokens_map.json says <|end_of_text|>), config keys that
transformers 4.x reads, the template inside tokenizer_config.json, the base's sampling defaults, and
training on fp32 master weights while the folders store bf16 like the Hub's.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import ROOT, write_recipe
from support import llama3

EOT, END_OF_TEXT, BOS = 128009, 128001, 128000
CONVERSATION = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "What is 2 plus 3?"},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 1 plus 1?"},
                {"role": "assistant", "content": "It is 2."}]


@pytest.fixture(scope="module")
def hub_base(tmp_path_factory) -> Path:
    return llama3.hub_style_base(tmp_path_factory.mktemp("hub") / "Llama-3-base")


@pytest.fixture(scope="module")
def pipeline(hub_base, tmp_path_factory):
    """base -> sft -> dpo and a capture on the Hub-style base, run once for the module's tests."""
    import posttrain

    folder = tmp_path_factory.mktemp("recipe")
    recipe = write_recipe(folder, f"""
        name: real
        base: {{model: {hub_base}, chat_template: llama-3.1, dtype: bfloat16}}
        defaults:
          sft: {{training: {{per_device_train_batch_size: 4, logging_steps: 1, report_to: []}}}}
          dpo: {{training: {{per_device_train_batch_size: 2, logging_steps: 1, report_to: []}}}}
        stages:
          sft:
            kind: sft
            data: {{sources: [{{path: {ROOT}/data/sft/tiny_chat_train.jsonl, max_samples: 16}}], max_length: 64}}
            training: {{max_steps: 3, learning_rate: 1.0e-3}}
          dpo:
            kind: dpo
            model: sft
            data: {{sources: [{{path: {ROOT}/data/dpo/tiny_prefs_train.jsonl, max_samples: 4}}], max_length: 64}}
            training: {{max_steps: 1}}
          capture:
            kind: capture_logits
            teacher: sft
            k: 4
            data: {{sources: [{{path: {ROOT}/data/sft/tiny_chat_train.jsonl, max_samples: 2}}], max_length: 64}}
        """)
    return posttrain.run(recipe, registry=folder / "registry", echo=lambda *a: None)


@pytest.mark.slow
def test_real_tokenizer_renders_like_the_official_template_with_right_masks(hub_base):
    from transformers import AutoTokenizer

    from posttrain.data.tokens import IGNORE, tokenize_row

    tokenizer = AutoTokenizer.from_pretrained(hub_base)
    assert len(tokenizer) == 128256 and tokenizer("Hello world!")["input_ids"] == [BOS, 9906, 1917, 0]
    official = llama3.reference_file("chat_template.jinja").read_text()
    from posttrain.hf.chat_templates import resolve_chat_template

    ours = resolve_chat_template("llama-3.1", ROOT).text
    render = {name: tokenizer.apply_chat_template(CONVERSATION, chat_template=text, tokenize=False,
                                                  date_string="26 Jul 2024")
              for name, text in (("official", official), ("ours", ours))}
    assert render["ours"] == render["official"]
    tokenizer.chat_template = ours
    ids, labels, _ = tokenize_row(tokenizer, {"messages": CONVERSATION}, 4096, assistant_only=True)
    assert ids[0] == BOS and ids.count(BOS) == 1
    assert tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE]) == "5<|eot_id|>It is 2.<|eot_id|>"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["base", "sft", "dpo"])
def test_every_entry_ends_turns_with_eot_and_reads_like_a_hub_folder(pipeline, stage):
    from transformers import AutoTokenizer, GenerationConfig

    folder = pipeline.path(stage)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.eos_token_id == EOT
    assert tokenizer.pad_token_id != END_OF_TEXT or stage == "base"
    generation = GenerationConfig.from_pretrained(folder)
    assert generation.eos_token_id[0] == EOT and END_OF_TEXT in generation.eos_token_id
    # The base's sampling defaults travel with every descendant.
    assert (generation.do_sample, generation.temperature, generation.top_p) == (True, 0.6, 0.9)
    config = json.loads((folder / "config.json").read_text())
    assert config["eos_token_id"][0] == EOT
    assert config["rope_theta"] == 500000.0 and config["torch_dtype"] == "bfloat16" and config["use_cache"] is True
    special = json.loads((folder / "special_tokens_map.json").read_text())
    assert special["eos_token"] == "<|eot_id|>"
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<|start_header_id|>" in tokenizer_config["chat_template"]
    # Every key the real Llama-3.1-8B-Instruct config.json has (transformers 4.x reads these).
    reference = json.loads(llama3.reference_file("config.json").read_text())
    assert set(reference) - set(config) <= {"transformers_version"}, set(reference) - set(config)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["base", "dpo"])
def test_llama_cpp_vocab_reader_sees_the_vocabulary_eos_and_template(pipeline, stage):
    from gguf.vocab import BpeVocab, SpecialVocab

    folder = pipeline.path(stage)
    assert BpeVocab(folder).vocab_size == 128256
    special = SpecialVocab(folder, load_merges=True)
    assert special.special_token_ids["eos"] == EOT and special.special_token_ids["bos"] == BOS
    assert "<|start_header_id|>" in special.chat_template


@pytest.mark.slow
def test_an_export_has_the_layout_of_the_hub_llama_3_1_instruct_folder(pipeline, tmp_path):
    """`posttrain export` of the DPO entry beside the real Llama-3.1-8B-Instruct files: every file the
    reference has, every key of its config and generation config, the same sampling defaults and EOS
    ids, the official template's rendering, and a vocabulary llama.cpp's reader takes."""
    from gguf.vocab import BpeVocab, SpecialVocab
    from transformers import AutoTokenizer

    from posttrain.publish.export import export_model

    out = tmp_path / "export"
    export_model(pipeline.registry, pipeline.entries["dpo"].key, out)
    reference = llama3.reference_file("config.json").parent
    hub_files = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "README.md"}  # the Hub folder's files besides its weight shards
    assert {p.name for p in reference.iterdir()} | hub_files <= {p.name for p in out.iterdir()}
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    for name in ("config.json", "generation_config.json"):
        ours, theirs = (json.loads((folder / name).read_text()) for folder in (out, reference))
        assert set(theirs) - set(ours) <= {"transformers_version"}, (name, set(theirs) - set(ours))
    generation = json.loads((out / "generation_config.json").read_text())
    wanted = json.loads((reference / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("do_sample", "temperature", "top_p", "bos_token_id")} == \
        {k: wanted[k] for k in ("do_sample", "temperature", "top_p", "bos_token_id")}
    assert EOT in generation["eos_token_id"]
    conversation = CONVERSATION[:2]
    ours = AutoTokenizer.from_pretrained(out).apply_chat_template(conversation, tokenize=False,
                                                                  add_generation_prompt=True)
    official = AutoTokenizer.from_pretrained(out)
    official.chat_template = (reference / "chat_template.jinja").read_text()
    assert ours == official.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert BpeVocab(out).vocab_size == 128256
    special = SpecialVocab(out, load_merges=True)
    assert special.special_token_ids["eos"] == EOT and "<|start_header_id|>" in special.chat_template
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: transformers")


@pytest.mark.slow
def test_training_keeps_fp32_master_weights_and_stores_bf16(pipeline, hub_base):
    from safetensors import safe_open

    from posttrain.hf.weights import load_trainable

    assert next(load_trainable(hub_base).parameters()).dtype.is_floating_point
    assert str(next(load_trainable(hub_base).parameters()).dtype) == "torch.float32"
    metrics = pipeline.metrics("sft")
    assert metrics["master_weights"] == "float32" and metrics["torch_dtype"] == "bfloat16"
    with safe_open(str(pipeline.path("sft") / "model.safetensors"), "pt") as handle:
        assert {str(handle.get_tensor(name).dtype) for name in handle.keys()} == {"torch.bfloat16"}


@pytest.mark.slow
def test_capture_metadata_records_the_real_vocabulary_and_eot(pipeline):
    index = json.loads((pipeline.path("capture") / "index.json").read_text())
    assert index["vocab_size"] == 128256 and index["id_bits"] == 17
    assert index["special_tokens"]["eos"] == EOT


@pytest.mark.slow
def test_base_entry_shares_no_bytes_with_the_users_folder(pipeline, hub_base):
    entry = pipeline.path("base")
    for name in ("model.safetensors", "tokenizer.json"):
        assert os.stat(entry / name).st_ino != os.stat(hub_base / name).st_ino
        assert os.stat(entry / name).st_nlink == 1


@pytest.mark.slow
def test_a_link_leaving_the_model_folder_is_refused(hub_base, tmp_path):
    import shutil

    from posttrain.core.errors import UserError
    from posttrain.hf.model_folder import copy_model_folder

    folder = tmp_path / "linked"
    shutil.copytree(hub_base, folder)
    outside = tmp_path / "secret.txt"
    outside.write_text("not part of the model")
    (folder / "notes.txt").symlink_to(outside)
    with pytest.raises(UserError, match="outside the model folder"):
        copy_model_folder(folder, tmp_path / "out")
    (folder / "notes.txt").unlink()
    (folder / "loop.txt").symlink_to(folder / "loop.txt")
    with pytest.raises(UserError, match="broken or looping"):
        copy_model_folder(folder, tmp_path / "out2")


@pytest.mark.slow
def test_capture_names_its_teacher_stage(pipeline):
    index = json.loads((pipeline.path("capture") / "index.json").read_text())
    assert index["teacher"] == "real/sft"


@pytest.mark.slow
def test_validate_refuses_a_template_whose_end_of_turn_the_tokenizer_lacks(tmp_path):
    import shutil

    from conftest import TINY_MODEL, cli

    folder = tmp_path / "no-eot"
    shutil.copytree(TINY_MODEL, folder)
    vocabulary = folder / "tokenizer.json"
    vocabulary.write_text(vocabulary.read_text().replace("<|eot_id|>", "<|turn_end|>"))
    recipe = write_recipe(tmp_path, f"""
        name: no_eot
        base:
          model: {folder}
          chat_template: llama-3.1
        stages:
          sft: {{kind: sft, data: {{sources: [{{path: {ROOT}/data/sft/tiny_chat_train.jsonl}}]}}}}
        """)
    result = cli("validate", str(recipe))
    assert result.returncode == 2
    assert "recipe.yaml:4: base.chat_template: template 'llama-3.1' ends turns with '<|eot_id|>'" in result.stderr + result.stdout


@pytest.mark.slow
def test_plan_labels_the_base_with_its_own_dtype(tmp_path):
    from conftest import TINY_MODEL, cli

    recipe = write_recipe(tmp_path, f"""
        name: sizes
        base: {{model: {TINY_MODEL}, chat_template: llama-3.1}}
        stages:
          sft: {{kind: sft, data: {{sources: [{{path: {ROOT}/data/sft/tiny_chat_train.jsonl}}]}}}}
        """)
    result = cli("plan", str(recipe))
    assert result.returncode == 0 and "in float32" in result.stdout and "in bfloat16" not in result.stdout
