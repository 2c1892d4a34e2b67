#!/usr/bin/env python
"""Build the tiny Llama-architecture base model that tests and `--profile tiny` recipes use.

Deterministic from --seed: a byte-level BPE tokenizer (trained on a generated corpus) carrying the
Llama-3 special tokens, and a 2-layer LlamaForCausalLM with hidden size 64, saved as a Hugging Face
folder. Like INTELLECT-1's base it has no chat template and ends text with <|end_of_text|>; recipes
attach the Llama-3.1 template. Nothing is downloaded.

    python scripts/make_tiny_model.py --out data/tiny-llama
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

# Llama-3's named special tokens, in its order (128000.. there; after the BPE vocabulary here).
SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 8)]
# Llama-3's pre-tokenizer split: contractions, words, 1-3 digit groups, punctuation runs, whitespace.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
WORDS = (
    "the a an of to in is are was what which who how many much answer question user assistant system "
    "please thank you hello sure here number numbers add plus minus times equals sum total reverse word "
    "words letter letters color red green blue yellow black white cat dog bird fish tree sky sea sun "
    "one two three four five six seven eight nine ten first last next before after capital city country "
    "good bad yes no true false because so and or not it this that with for on at by from as be can will"
).split()


def corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        out.append(rng.choice([
            f"{a} plus {b} equals {a + b}.",
            f"What is {a} + {b}? The answer is {a + b}.",
            f"{words.capitalize()}.",
            f"Q: {words}? A: {rng.choice(WORDS)}!",
            f"Reverse '{words.split()[0]}' -> '{words.split()[0][::-1]}'",
        ]))
    return out


def build_tokenizer(seed: int, vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token="<|end_of_text|>",
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def build_model(seed: int, tokenizer, layers: int, hidden: int):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 7 // 2,  # Llama-3's ratio (4096 -> 14336)
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in Llama-3 (32 heads / 8 KV heads)
        max_position_embeddings=1024,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "tiny-llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args()
    tokenizer = build_tokenizer(args.seed, args.vocab_size)
    model = build_model(args.seed, tokenizer, args.layers, args.hidden)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n:,} parameters, vocab {len(tokenizer)}")


if __name__ == "__main__":
    main()
