#!/usr/bin/env python
"""GPU smoke: SFT, DPO, capture and distill steps of a ~1B random Llama with V = 128256, bf16 mixed precision.

Run it whenever a GPU is available (the project never needs one to pass its tests):

    python bench/gpu_smoke.py [--steps 30] [--seq 1024] [--batch 4] [--out results.json] [--trace DIR]

`--trace DIR` runs each listed stage again for a few steps under torch.profiler (CPU and CUDA
activities) and writes DIR/trace_<stage>.json.gz (chrome://tracing, Perfetto) and the 25 costliest ops
into the results: where the GPU time goes, and where it waits (cudaStreamSynchronize, item, copies).

For each stage it reports tokens/s, MFU (6 x params x tokens/s against the card's dense bf16 peak),
peak GPU memory (torch.cuda.max_memory_allocated) against `posttrain plan`'s estimate for the same
settings, and, for SFT, the same steps as a plain trl SFTTrainer script on the same model and rows in the
same process (the baseline). Weights are fp32 masters under bf16 autocast, as posttrain trains by
default. The tokenizer is the tiny test model's (ids < 1024); the model's vocabulary, and so the
[tokens x 128256] logits, are the real size. `--tiny` runs the same code on a small shape (CPU is fine)
to check the script itself.
"""
from __future__ import annotations

import argparse
import importlib.util
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "data" / "tiny-llama"
# Llama-3.2-1B's shape (1.24B parameters, tied embeddings), vocabulary of Llama-3.
ONE_B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
         "num_key_value_heads": 8, "tie_word_embeddings": True}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "tie_word_embeddings": True}
# Dense bf16 peak of the card, for MFU (NVIDIA's datasheets: H100 SXM and H200 989 TFLOP/s).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def build_model(folder: Path, shape: dict) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, folder / name)
    config = LlamaConfig(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=1008, eos_token_id=1009, pad_token_id=1012, **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # stored like a Hub folder, trained on fp32 masters
    model.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def write_data(folder: Path, rows: int, words: int) -> tuple[Path, Path]:
    """Chat rows long enough to fill max_length (so every sample is exactly max_length tokens) and
    preference pairs of half that length."""
    rng = random.Random(0)
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    chat, prefs = folder / "chat.jsonl", folder / "prefs.jsonl"
    with chat.open("w") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"messages": [{"role": "user", "content": text(max(4, words // 16))},
                                              {"role": "assistant", "content": text(words)}]}) + "\n")
    with prefs.open("w") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"prompt": text(max(4, words // 16)), "chosen": text(words // 8),
                                 "rejected": text(words // 8)}) + "\n")
    return chat, prefs


def gpu_peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None


def reset_gpu() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def plan_estimate(kind: str, model_dir: Path, stage: dict) -> str:
    """`posttrain plan`'s per-device estimate for this stage's settings."""
    from posttrain.planning.memory import architecture_of, estimate
    from posttrain.kinds import get_stage

    config = get_stage(kind).Config.model_validate({"kind": kind, **stage})
    return estimate(kind, config, architecture_of(str(model_dir), ROOT), 1)


def pair_tokens(model_dir: str, prefs: Path, seq: int) -> float:
    """Mean tokens of one preference pair (prompt + chosen, prompt + rejected) as DPO sees them."""
    from transformers import AutoTokenizer

    from posttrain.data.tokens import chat_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sizes = []
    for line in prefs.read_text().splitlines()[:16]:
        row = json.loads(line)
        prompt = [{"role": "user", "content": row["prompt"]}]
        sizes.append(sum(min(seq, len(chat_token_ids(tokenizer, prompt + [{"role": "assistant", "content": row[side]}])))
                         for side in ("chosen", "rejected")))
    return sum(sizes) / len(sizes)


def plain_trl_sft(model_dir: Path, chat: Path, out: Path, training: dict, seq: int) -> float:
    """The baseline: trl's SFTTrainer as its docs show it, same rows, steps and precision."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from posttrain.hf.chat_templates import resolve_chat_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = resolve_chat_template("llama-3.1", ROOT).text
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    args = SFTConfig(output_dir=str(out), max_length=seq, assistant_only_loss=True, save_strategy="no",
                     activation_checkpointing=False, gradient_checkpointing=None, seed=42, **training)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=load_dataset("json", data_files=str(chat), split="train"))
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="small shape, to check the script on a CPU")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("--only", default="sft_plain_trl,sft,dpo,capture,distill",
                        help="comma-separated stages, run in this order (sft_again: SFT again at another lr; "
                             "sft_compiled / sft_liger / sft_padding_free / dpo_padding_free: the fast paths, same shape; "
                             "capture_vllm: the capture through vLLM, compared with the HF one; eval_vllm: lm-eval's local tasks on the HF and the vllm backends; both need vLLM installed)")
    parser.add_argument("--trace", default=None, help="write torch.profiler traces of sft, dpo and distill here")
    parser.add_argument("--trace-steps", type=int, default=4, help="steps of each traced stage")
    args = parser.parse_args()
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import posttrain

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in device), None)
    work = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    registry = work / "registry"
    params = build_model(work / "base", TINY if args.tiny else ONE_B)
    chat, prefs = write_data(work, rows=max(64, args.steps * args.batch), words=args.seq)
    training = {"max_steps": args.steps, "per_device_train_batch_size": args.batch, "learning_rate": 1e-5,
                "logging_steps": max(1, args.steps // 5), "report_to": [], "bf16": cuda,
                "dataloader_num_workers": 0}
    if not cuda:
        training["use_cpu"] = True
    results: dict = {"device": device, "params": params, "seq": args.seq, "batch": args.batch, "steps": args.steps,
                     "torch": torch.__version__, "stages": {}}
    tokens_per_step = args.batch * args.seq

    def record(name: str, seconds: float, tokens: int, estimate: str | None, flops_per_token: float, **extra):
        rate = tokens / seconds
        row = {"seconds": round(seconds, 2), "tokens_per_s": round(rate, 1),
               "mfu": round(flops_per_token * params * rate / peak, 4) if peak else None,
               "peak_gpu_gib": round(gpu_peak_gib(), 2) if cuda else None, "plan_estimate": estimate, **extra}
        results["stages"][name] = row
        print(f"{name:<14} {json.dumps(row)}", flush=True)

    def stage(name, fn):
        reset_gpu()
        try:
            fn()
        except Exception:  # noqa: BLE001 - a smoke run reports every stage it can
            results["stages"][name] = {"error": traceback.format_exc()[-2000:]}
            print(f"{name} FAILED\n{traceback.format_exc()}", flush=True)

    sft_stage = {"data": {"sources": [{"path": str(chat)}], "max_length": args.seq}, "training": training}

    def sft_again():
        posttrain.sft(work / "base", sft_stage["data"], registry=registry, chat_template="llama-3.1",
                      **{**training, "learning_rate": 2e-5})
        record("sft_again", _manifest_metrics(registry, "sft")["train_seconds"], args.steps * tokens_per_step,
               None, 6)

    def trl_baseline():
        seconds = plain_trl_sft(work / "base", chat, work / "trl", training, args.seq)
        record("sft_plain_trl", seconds, args.steps * tokens_per_step, None, 6)

    def sft():
        out = posttrain.sft(work / "base", sft_stage["data"], registry=registry, chat_template="llama-3.1",
                            **training)
        record("sft", _manifest_metrics(registry, "sft")["train_seconds"], args.steps * tokens_per_step, plan_estimate("sft", work / "base", sft_stage), 6)
        results["sft_dir"] = str(out)

    def dpo():
        pairs_stage = {"data": {"sources": [{"path": str(prefs)}], "max_length": args.seq}, "training": training}
        posttrain.dpo(results["sft_dir"], pairs_stage["data"], registry=registry, **training)
        metrics = _manifest_metrics(registry, "dpo")
        record("dpo", metrics["train_seconds"], args.steps * args.batch * pair_tokens(results["sft_dir"], prefs, args.seq),
               plan_estimate("dpo", work / "base", pairs_stage), 6)

    def sft_variant(name: str, learning_rate: float, stage_fields: dict | None = None, **fast):
        # Another learning rate, so the entry is built: speed settings alone are out of keys (it would be reused).
        posttrain.sft(work / "base", sft_stage["data"], registry=registry, chat_template="llama-3.1",
                      stage=stage_fields, **{**training, "learning_rate": learning_rate, **fast})
        record(name, _manifest_metrics(registry, "sft")["train_seconds"], args.steps * tokens_per_step, None, 6)

    def sft_compiled():
        sft_variant("sft_compiled", 3e-5, torch_compile=True)

    def sft_liger():
        sft_variant("sft_liger", 4e-5, use_liger_kernel=True)

    # Padding-free batches save attention time only with a variable-length kernel: flash-attention when
    # it is installed, else SDPA (block-diagonal mask over the packed row), as recorded.
    varlen = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    results["padding_free_attention"] = varlen

    def sft_padding_free():
        sft_variant("sft_padding_free", 5e-5, {"padding_free": True, "attn_implementation": varlen})

    def dpo_padding_free():
        pairs_stage = {"data": {"sources": [{"path": str(prefs)}], "max_length": args.seq}, "training": training}
        posttrain.dpo(results["sft_dir"], pairs_stage["data"], registry=registry,
                      stage={"padding_free": True, "attn_implementation": varlen}, **training)
        metrics = _manifest_metrics(registry, "dpo")
        record("dpo_padding_free", metrics["train_seconds"],
               args.steps * args.batch * pair_tokens(results["sft_dir"], prefs, args.seq), None, 6,
               padding_fraction=metrics["padding_fraction"])

    def capture():
        rows = args.steps * args.batch
        started = time.perf_counter()
        posttrain.capture_logits(results["sft_dir"], {"sources": [{"path": str(chat), "max_samples": rows}],
                                                      "max_length": args.seq}, k=64, registry=registry,
                                 batch_size=args.batch)
        metrics = _manifest_metrics(registry, "capture_logits")
        record("capture", metrics["seconds"], metrics["tokens"],
               plan_estimate("capture_logits", work / "base", {"data": sft_stage["data"], "batch_size": args.batch}),
               2, wall_seconds=round(time.perf_counter() - started, 2), bytes_per_token=metrics["bytes_per_token"])
        results["capture_dir"] = str(_entry_path(registry, "capture_logits"))

    def capture_vllm():
        """The same capture through vLLM (when installed): ids identical where not tied, values close."""
        import numpy as np

        from posttrain.kd.shards import read_index, read_shard

        rows = args.steps * args.batch
        other = work / "registry-vllm"
        started = time.perf_counter()
        served = posttrain.capture_logits(results["sft_dir"], {"sources": [{"path": str(chat), "max_samples": rows}],
                                                               "max_length": args.seq}, k=64, registry=other,
                                          batch_size=args.batch, backend="vllm",
                                          vllm={"gpu_memory_utilization": 0.5})
        seconds = time.perf_counter() - started
        hf = Path(results["capture_dir"])
        same_ids = positions = 0
        worst = 0.0
        for item in read_index(hf)["shards"]:
            a, b = read_shard(hf / item["file"]), read_shard(served / item["file"])
            for i in range(a.num_sequences):
                x, y = a.sequence(i), b.sequence(i)
                last = len(x["input_ids"]) - 1  # no next token there: vLLM gives no target, none is trained
                # Compared by id: near-tied probabilities may come out in another order (or, at the k-th
                # place, as another id) under another kernel; those positions are counted, not compared.
                ox, oy = np.argsort(x["target_ids"][:last], axis=1), np.argsort(y["target_ids"][:last], axis=1)
                ids_x = np.take_along_axis(x["target_ids"][:last], ox, axis=1)
                ids_y = np.take_along_axis(y["target_ids"][:last], oy, axis=1)
                same = (ids_x == ids_y).all(axis=1)
                same_ids += int(same.sum())
                positions += last
                if same.any():
                    vx = np.take_along_axis(x["target_values"][:last], ox, axis=1)[same]
                    vy = np.take_along_axis(y["target_values"][:last], oy, axis=1)[same]
                    worst = max(worst, float(np.abs(vx - vy).max()))
        metrics = _manifest_metrics(other, "capture_logits")
        record("capture_vllm", metrics["seconds"], metrics["tokens"], None, 2, wall_seconds=round(seconds, 2),
               positions_with_the_same_top_k_ids=round(same_ids / max(positions, 1), 4),
               max_abs_logprob_difference=round(worst, 4))

    def eval_vllm():
        """lm-eval on the local tasks with the HF backend and with vLLM (when installed), same model."""
        import yaml

        tasks = {"kind": "eval", "models": ["base"], "tasks": ["tiny_arith_mc", "tiny_arith_gen"],
                 "task_dirs": [str(ROOT / "data" / "eval" / "tasks")], "batch_size": args.batch}
        recipe = work / "eval_backends.yaml"
        recipe.write_text(yaml.safe_dump({
            "name": "eval_backends", "base": {"model": results["sft_dir"], "chat_template": "llama-3.1"},
            "stages": {"on_hf": tasks, "on_vllm": {**tasks, "backend": "vllm",
                                                   "vllm": {"gpu_memory_utilization": 0.5}}}}))
        result = posttrain.run(recipe, registry=work / "registry-eval", echo=lambda *a: None)
        hf, served = (result.metrics(s)["results"]["base"] for s in ("on_hf", "on_vllm"))
        seconds = {s: result.entries[s].manifest["timings"]["seconds"] for s in ("on_hf", "on_vllm")}
        results["stages"]["eval_vllm"] = {
            "hf": hf, "vllm": served, "seconds_hf": seconds["on_hf"], "seconds_vllm": seconds["on_vllm"],
            "max_abs_metric_difference": max(abs(hf[m]["value"] - served[m]["value"]) for m in hf)}
        print(f"eval_vllm      {json.dumps(results['stages']['eval_vllm'])}", flush=True)

    def distill():
        posttrain.distill(work / "base", results["capture_dir"], registry=registry, chat_template="llama-3.1",
                          **training)
        metrics = _manifest_metrics(registry, "distill")
        record("distill", metrics["train_seconds"], args.steps * tokens_per_step,
               plan_estimate("distill", work / "base", {"teacher_logits_path": "x", "training": training}), 6)

    runs = {"sft_plain_trl": trl_baseline, "sft": sft, "sft_again": sft_again, "dpo": dpo, "capture": capture,
            "capture_vllm": capture_vllm, "distill": distill, "eval_vllm": eval_vllm, "sft_compiled": sft_compiled,
            "sft_liger": sft_liger, "sft_padding_free": sft_padding_free, "dpo_padding_free": dpo_padding_free}
    def traced(name: str) -> None:
        """The stage again, a few steps at another learning rate (so it is built, not reused), profiled."""
        import gzip

        from torch.profiler import ProfilerActivity, profile

        folder = Path(args.trace)
        folder.mkdir(parents=True, exist_ok=True)
        few = {**training, "max_steps": args.trace_steps, "learning_rate": 7e-6}
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, record_shapes=False) as prof:
            if name == "distill":
                posttrain.distill(work / "base", results["capture_dir"], registry=registry, chat_template="llama-3.1",
                                  **few)
            elif name == "dpo":
                posttrain.dpo(results["sft_dir"], {"sources": [{"path": str(prefs)}], "max_length": args.seq},
                              registry=registry, **few)
            else:
                posttrain.sft(work / "base", sft_stage["data"], registry=registry, chat_template="llama-3.1", **few)
        raw = folder / f"trace_{name}.json"
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as source, gzip.open(f"{raw}.gz", "wb") as target:
            shutil.copyfileobj(source, target)
        raw.unlink()
        sort = "cuda_time_total" if cuda else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=25)
        results.setdefault("profiles", {})[name] = {"trace": f"{raw}.gz", "steps": args.trace_steps, "top_ops": table}
        print(f"trace of {name}: {raw}.gz\n{table}", flush=True)

    for name in args.only.split(","):
        fn = runs[name]
        if name in ("dpo", "dpo_padding_free", "capture", "eval_vllm") and "sft_dir" not in results:
            continue
        if name in ("distill", "capture_vllm") and "capture_dir" not in results:
            continue
        if name in ("capture_vllm", "eval_vllm") and importlib.util.find_spec("vllm") is None:
            print(f"{name} skipped: vLLM is not installed (pip install 'posttrain[vllm]')", flush=True)
            continue
        if name == "sft_liger" and importlib.util.find_spec("liger_kernel") is None:
            print(f"{name} skipped: liger-kernel is not installed (pip install 'posttrain[liger]')", flush=True)
            continue
        stage(name, fn)
        if args.trace and name in ("sft", "dpo", "distill") and name in results["stages"]:
            stage(f"trace_{name}", lambda name=name: traced(name))
    base, ours = results["stages"].get("sft_plain_trl", {}), results["stages"].get("sft", {})
    if base.get("tokens_per_s") and ours.get("tokens_per_s"):
        results["sft_tokens_per_s_ratio_vs_trl"] = round(ours["tokens_per_s"] / base["tokens_per_s"], 3)
        print(f"SFT tokens/s, posttrain / plain trl: {results['sft_tokens_per_s_ratio_vs_trl']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


def _entry_path(registry: Path, stage: str) -> Path:
    from posttrain.registry import Registry

    reg = Registry(registry)
    return reg.get(reg.get_ref(f"api-{stage}/{stage}")).path


def _manifest_metrics(registry: Path, stage: str) -> dict:
    from posttrain.registry import Registry

    reg = Registry(registry)
    return reg.get(reg.get_ref(f"api-{stage}/{stage}")).manifest["metrics"]


if __name__ == "__main__":
    main()
