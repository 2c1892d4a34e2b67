#!/usr/bin/env python
"""Teacher-logit storage and distillation costs, each against a named baseline measured in the same run.

1. Bytes per token of stored targets at k = 32, 64, 128 for V = 128256 (Llama-3), per value encoding,
   with the mean absolute log-prob error; Zipf-shaped synthetic teacher logits (no hub access here).
2. Capture time against a pure teacher forward over the same tokens and batches (goal <= 1.2).
3. Distill step time against SFT step time on the same student, data and batch size (goal <= 1.15).
4. Peak memory of the chunked KD loss against the naive full log-softmax (forward + backward).

    python bench/distill_bench.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MEASURE = str(Path(__file__).resolve().parent / "_measure.py")
V = 128256

MEMORY_SCRIPT = """
import sys, torch
from posttrain.kd.losses import distill_loss, sparse_kd
mode, n, hidden_size, vocab, k = sys.argv[1], int(sys.argv[2]), 512, 128256, 64
torch.manual_seed(0)
head = torch.nn.Linear(hidden_size, vocab, bias=False)
hidden = torch.randn(n, hidden_size, requires_grad=True)
ids = torch.randint(0, vocab, (n, k))
values = torch.log_softmax(torch.randn(n, k), -1) - 1.0
labels = torch.randint(0, vocab, (n,))
if mode == "naive":
    logits = head(hidden)
    loss = sparse_kd(logits, ids, values).mean()
else:
    loss, _ = distill_loss(hidden, head, ids, values, labels, alpha=1.0, chunk_size=256)
loss.backward()
"""


def storage_table() -> None:
    from posttrain.kd.packing import ValueCodec
    from posttrain.kd.shards import shard_meta, write_shard

    rng = np.random.default_rng(0)
    positions = 512
    prior = -1.1 * np.log(np.arange(1, V + 1))  # Zipf-like: frequent (low-id) tokens dominate
    print(f"1. stored bytes per token, V = {V}, {positions} positions (file size incl. input ids and header)")
    print(f"   {'k':>4} {'encoding':>8} {'bytes/token':>12} {'mean |err| nats':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        for k in (32, 64, 128):
            ids = np.empty((positions, k), dtype=np.int64)
            values = np.empty((positions, k), dtype=np.float32)
            for p in range(positions):
                logits = prior + rng.normal(0, 2.0, V)
                logp = logits - np.logaddexp.reduce(logits)
                top = np.argpartition(-logp, k)[:k]
                top = top[np.argsort(-logp[top])]
                ids[p], values[p] = top, logp[top]
            for encoding in ("fp16", "q12", "q10", "q8"):
                meta = shard_meta(teacher="synthetic", teacher_key="", tokenizer_hash="", vocab_size=V, k=k,
                                  encoding=encoding, mode="topk", samples=None, temperature=1.0,
                                  chat_template_sha256="", data_fingerprint="", values="logprobs",
                                  special_tokens={})
                path = Path(tmp) / f"{k}-{encoding}.safetensors"
                write_shard(path, [list(range(positions))], [[1] * positions], ids, values, meta)
                codec = ValueCodec(encoding)
                err = np.abs(codec.decode(codec.encode(values), k) - values).mean()
                print(f"   {k:>4} {encoding:>8} {path.stat().st_size / positions:>12.1f} {err:>16.4f}")
    print("   ids alone take ceil(17 * k / 8) bytes: 68 / 136 / 272 B at k = 32 / 64 / 128")


def capture_vs_forward(model_dir: Path, tmp: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import posttrain
    from posttrain.data.sources import DataConfig, load_conversations
    from posttrain.data.tokens import tokenize_row

    data = ROOT / "data" / "sft" / "tiny_chat_train.jsonl"
    os.environ["POSTTRAIN_REGISTRY"] = str(tmp / "registry")
    registered = posttrain.run_stage("model", model_dir, name="bench-teacher", chat_template="llama-3.1",
                                     model=str(model_dir))
    teacher = registered.path("base")  # the base entry carries the chat template
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    rows, _ = load_conversations(DataConfig(sources=[{"path": str(data)}]), ROOT, 42)
    sequences = [tokenize_row(tok, r, 96, True)[0] for r in rows]
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    start = time.perf_counter()
    for i in range(0, len(sequences), 8):  # the same batches the capture stage makes
        batch = sequences[i:i + 8]
        longest = max(len(s) for s in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(batch):
            ids[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), 1
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    forward = time.perf_counter() - start
    result = posttrain.capture_logits(teacher=teacher, data=data, k=64, batch_size=8)
    capture = json.loads((result / "manifest.json").read_text())["metrics"]["seconds"]
    print(f"2. capture vs pure teacher forward ({len(sequences)} sequences, 29M-parameter teacher, k = 64, fp16)")
    print(f"   pure forward {forward:6.2f} s (baseline)   capture {capture:6.2f} s   ratio {capture / forward:.2f}"
          "  (goal <= 1.2)")


def distill_vs_sft(model_dir: Path, tmp: Path) -> None:
    import posttrain

    data = ROOT / "data" / "sft" / "tiny_chat_train.jsonl"
    common = {"max_steps": 30, "per_device_train_batch_size": 8, "learning_rate": 1e-4, "report_to": [],
              "logging_steps": 10}
    sft_dir = posttrain.sft(model=model_dir, data={"sources": [{"path": str(data)}], "max_length": 96},
                            chat_template="llama-3.1", stage={"save_steps": 10 ** 6}, **common)
    logits = posttrain.capture_logits(teacher=model_dir, data={"sources": [{"path": str(data)}], "max_length": 96},
                                      chat_template="llama-3.1", k=64)
    kd_dir = posttrain.distill(model=model_dir, teacher_logits=logits, chat_template="llama-3.1",
                               stage={"save_steps": 10 ** 6}, **common)
    sft = json.loads((sft_dir / "manifest.json").read_text())["metrics"]["train_seconds"]
    kd = json.loads((kd_dir / "manifest.json").read_text())["metrics"]["train_seconds"]
    print("3. distill step vs SFT step (29M-parameter student, 30 steps of 8 sequences)")
    print(f"   SFT {sft / 30 * 1000:7.1f} ms/step (baseline)   distill {kd / 30 * 1000:7.1f} ms/step   ratio "
          f"{kd / sft:.2f}  (goal <= 1.15)")


def memory(tmp: Path) -> None:
    script = tmp / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    results = tmp / "memory.jsonl"
    peaks = {}
    for mode in ("naive", "chunked"):
        subprocess.run([sys.executable, MEASURE, str(results), str(script), mode, "2048"], check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
        peaks[mode] = json.loads(results.read_text().splitlines()[-1])["peak_rss_mb"]
    print("4. peak memory, KD loss forward + backward, 2048 positions, V = 128256, hidden 512 (process RSS)")
    print(f"   naive {peaks['naive']:7.0f} MB (baseline)   chunked {peaks['chunked']:7.0f} MB   ratio "
          f"{peaks['chunked'] / peaks['naive']:.2f}")


def main() -> None:
    if "--skip-storage" not in sys.argv:
        storage_table()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "--out", str(model_dir),
                        "--hidden", "512", "--layers", "8"], check=True, capture_output=True)
        capture_vs_forward(model_dir, tmp)
        distill_vs_sft(model_dir, tmp)
        memory(tmp)


if __name__ == "__main__":
    main()
