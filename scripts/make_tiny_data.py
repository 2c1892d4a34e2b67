#!/usr/bin/env python
"""Write the small synthetic chat datasets in data/ (deterministic; committed, rerun only to change them).

    python scripts/make_tiny_data.py
"""
from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"
WORDS = ["cat", "dog", "bird", "fish", "tree", "sky", "sea", "sun", "red", "blue", "green", "one", "two"]


def chat_rows(seed: int, count: int, skill: str = "both") -> list[dict]:
    """Two learnable skills: adding small numbers and reversing a word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        pick_add = rng.random() < 0.5
        if skill != "both":
            pick_add = skill == "add"
        if pick_add:
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                      {"role": "assistant", "content": f"{a + b}"}]})
        else:
            word = rng.choice(WORDS)
            rows.append({"messages": [{"role": "user", "content": f"Reverse the word {word}."},
                                      {"role": "assistant", "content": word[::-1]}]})
    return rows


def preference_rows(seed: int, count: int) -> list[dict]:
    """Chosen: the right answer in a full sentence. Rejected: a wrong, curt one. Learnable on both counts."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                     "chosen": [{"role": "assistant", "content": f"The answer is {a + b}."}],
                     "rejected": [{"role": "assistant", "content": f"{wrong}!"}]})
    return rows


def comparison_preference_rows(seed: int, count: int) -> list[dict]:
    """A skill the chat data never asks for: which of two numbers is larger (chosen: the larger,
    rejected: the smaller, both as terse as the chat answers). DPO on it teaches something new without
    fighting the chat data's answer format, so a merge can keep both (the flagship's tiny merge search)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.sample(range(0, 40), 2)
        rows.append({"prompt": [{"role": "user", "content": f"Which is larger, {a} or {b}?"}],
                     "chosen": [{"role": "assistant", "content": f"{max(a, b)}"}],
                     "rejected": [{"role": "assistant", "content": f"{min(a, b)}"}]})
    return rows


def arcee_layout_logits(rows: list[dict], k: int = 8) -> list[dict]:
    """Top-k raw logits of the tiny model in the arcee-ai/LLama-405B-Logits layout (input_ids,
    attention_mask, token_ids, top_values), so the flagship recipe's tiny profile runs its distill
    stage on the same kind of data as the real one. (The tiny model is no real teacher: the
    distillation quality gate lives in recipes/ci/, with a trained teacher.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.hf.chat_templates import resolve_chat_template

    model_dir = DATA / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = resolve_chat_template("llama-3.1", DATA).text
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for row in rows:
        ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        values, top = logits.topk(k, dim=-1)
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "token_ids": top.tolist(),
                    "top_values": [[round(v, 3) for v in position] for position in values.tolist()]})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    print(f"wrote {path} ({len(rows)} rows)")


def main() -> None:
    # dev: what selections rank sweep candidates by, apart from the held-out rows that judge the result.
    for name, seed, count in (("tiny_chat_train", 1, 256), ("tiny_chat_heldout", 2, 64), ("tiny_chat_dev", 5, 64)):
        write_jsonl(DATA / "sft" / f"{name}.jsonl", chat_rows(seed, count))
    for skill in ("add", "reverse"):
        for split, seed, count in (("train", 10, 256), ("heldout", 11, 32)):
            write_jsonl(DATA / "sft" / f"tiny_{skill}_{split}.jsonl", chat_rows(seed, count, skill))
    write_jsonl(DATA / "distill" / "tiny_teacher_logits.jsonl", arcee_layout_logits(chat_rows(1, 48)))
    for name, seed, count in (("tiny_prefs_train", 3, 128), ("tiny_prefs_heldout", 4, 32), ("tiny_prefs_dev", 6, 32)):
        write_jsonl(DATA / "dpo" / f"{name}.jsonl", preference_rows(seed, count))
    for split, seed, count in (("train", 7, 256), ("heldout", 8, 128), ("dev", 9, 128)):
        write_jsonl(DATA / "dpo" / f"tiny_compare_{split}.jsonl", comparison_preference_rows(seed, count))


if __name__ == "__main__":
    main()
