"""The real Llama-3 tokenizer (V = 128256) and Hub-style Llama-3.1 folders, built offline.

The BPE ranks come from the `tokenizer.model` file shipped in the PyPI wheel `llama-models`; the
special tokens and their ids are those of the Hub's Llama-3.1 folders (128000 <|begin_of_text|>,
128001 <|end_of_text|>, 128009 <|eot_id|>, ...). A Hub-style folder also carries the
`special_tokens_map.json` with eos <|end_of_text|> that real base folders ship.
"""
from __future__ import annotations

import json
from pathlib import Path

# The real Llama-3.1-8B-Instruct config, generation config and official template, in the shared/ folder
# that lies beside a checkout (and beside CI's clone).
REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "llama-3.1"
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NAMED = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 2: "<|reserved_special_token_0|>",
         3: "<|reserved_special_token_1|>", 4: "<|finetune_right_pad_id|>", 5: "<|reserved_special_token_2|>",
         6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>"}
BASE_TOKENS = 128000
VOCAB = 128256


def special_tokens() -> list[str]:
    return [NAMED.get(i, f"<|reserved_special_token_{i - 8}|>") for i in range(VOCAB - BASE_TOKENS)]


def ranks_file() -> Path:
    import llama_models

    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def build_tokenizer(out_dir: Path, eos: str = "<|end_of_text|>"):
    """Save the real Llama-3 tokenizer into `out_dir` as a base model's folder has it; returns it."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(ranks_file()), pattern=PATTERN,
                                extra_special_tokens=special_tokens()).converted()
    # As the Hub's Llama-3 tokenizer.json: plain text gets <|begin_of_text|> in front.
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", BASE_TOKENS)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token=eos,
                                        model_max_length=131072)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def hub_style_base(out_dir: Path, hidden: int = 32, layers: int = 1, dtype: str = "bfloat16") -> Path:
    """A small random Llama with the real vocabulary, laid out like a Hub Llama-3.1 base folder:
    weights in `dtype`, `special_tokens_map.json` with eos <|end_of_text|>, sampling defaults in
    generation_config.json."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(str(out_dir))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 128000, "eos_token_id": 128001, "do_sample": True, "temperature": 0.6, "top_p": 0.9},
        indent=2))
    return out_dir


def reference_file(name: str) -> Path:
    """A file of the reference folder; the test is skipped (saying why) where shared/ is not beside the checkout."""
    import pytest

    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(f"{path} not found: the reference Llama-3.1 folder comes with shared/ beside the checkout")
    return path
