"""Rough per-device memory estimates for `posttrain plan`, computed offline from model configs.

Rules of thumb (documented, not measured): full fine-tuning with AdamW in mixed precision keeps 16
bytes per parameter (bf16 weights and grads, fp32 master weights and two moments), sharded over the
processes under FSDP / ZeRO-3; activations with gradient checkpointing keep one hidden-state tensor per
layer plus one layer's working set (~34 bytes x tokens x hidden, Korthikanti et al. 2022) and the
logits; LoRA keeps frozen bf16 weights (2 bytes per parameter) plus the adapter; inference 2 bytes per
parameter. Estimates are for planning, not guarantees.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024 ** 3
BYTES_PER_PARAMETER = {"float32": 4, "bfloat16": 2, "float16": 2}

# Published architectures, so `plan` works with no download (config.json fields of each model).
KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "PrimeIntellect/INTELLECT-1": {"num_hidden_layers": 42, "hidden_size": 4096, "intermediate_size": 14336,
                                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                                   "tie_word_embeddings": False},
    "meta-llama/Llama-3.1-8B": {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
                                "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                                "tie_word_embeddings": False},
    "meta-llama/Llama-3.1-70B": {"num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672,
                                 "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                                 "tie_word_embeddings": False},
    "meta-llama/Llama-3.1-405B": {"num_hidden_layers": 126, "hidden_size": 16384, "intermediate_size": 53248,
                                  "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256,
                                  "tie_word_embeddings": False},
}
for _name in list(KNOWN_ARCHITECTURES):
    KNOWN_ARCHITECTURES[_name + "-Instruct"] = KNOWN_ARCHITECTURES[_name]
KNOWN_ARCHITECTURES["PrimeIntellect/INTELLECT-1-Instruct"] = KNOWN_ARCHITECTURES["PrimeIntellect/INTELLECT-1"]


@dataclass(frozen=True)
class Architecture:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    dtype: str = "bfloat16"  # how the weights are stored

    @property
    def parameters(self) -> int:
        kv = self.hidden // self.heads * self.kv_heads
        attention = self.hidden * (self.hidden + 2 * kv) + self.hidden * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * (attention + mlp + 2 * self.hidden) + embeddings + self.hidden


def architecture_of(model: str, recipe_dir: Path) -> Architecture | None:
    """From a local folder's config.json, the local HF cache, or the table above; None if unknown."""
    config = None
    local = Path(model).expanduser()
    local = local if local.is_absolute() else recipe_dir / local
    if (local / "config.json").is_file():
        config = json.loads((local / "config.json").read_text())
    elif model in KNOWN_ARCHITECTURES:
        config = KNOWN_ARCHITECTURES[model]
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
            if isinstance(cached, str):
                config = json.loads(Path(cached).read_text())
        except Exception:  # noqa: BLE001 - an estimate is optional; never fail `plan` over it
            config = None
    if not config or "hidden_size" not in config:
        return None
    heads = config.get("num_attention_heads", 1)
    return Architecture(config.get("num_hidden_layers", 0), config["hidden_size"],
                        config.get("intermediate_size", 4 * config["hidden_size"]), heads,
                        config.get("num_key_value_heads", heads), config.get("vocab_size", 0),
                        bool(config.get("tie_word_embeddings", False)),
                        str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"))


def _bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2)):
        if n >= size or unit == "MiB":
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def estimate(kind: str, config: Any, arch: Architecture, processes: int) -> str:
    """A one-line estimate for one stage."""
    p = arch.parameters
    training = dict(getattr(config, "training", {}) or {})
    batch = int(training.get("per_device_train_batch_size", 8))
    data = getattr(config, "data", None)
    seq = getattr(data, "max_length", None) or getattr(config, "max_length", 2048)
    checkpointing = bool(getattr(config, "gradient_checkpointing", False))
    if kind in ("sft", "dpo", "distill"):
        if kind == "dpo":
            batch *= 2  # chosen and rejected in one forward
        tokens = batch * seq
        if getattr(config, "lora", None):
            states = 2 * p  # frozen bf16 weights, not sharded by plain DDP
            shard = "per process"
        else:
            states = 16 * p / processes
            shard = f"sharded over {processes}" if processes > 1 else "1 device"
        per_layer = 2 * tokens * arch.hidden if checkpointing else 34 * tokens * arch.hidden
        activations = arch.layers * per_layer + (34 * tokens * arch.hidden if checkpointing else 0)
        if kind == "distill":
            logits = 3 * 4 * min(tokens, getattr(config, "chunk_size", 1024)) * arch.vocab
        else:
            logits = tokens * arch.vocab * 6  # bf16 logits + fp32 loss copy
        reference = 0
        if kind == "dpo" and not getattr(config, "precompute_ref_log_probs", True) and not getattr(config, "lora", None):
            reference = 2 * p / processes
        total = states + activations + logits + reference
        return (f"~{_bytes(total)}/device ({_count(p)} params, {shard}, batch {batch} x {seq}"
                f"{', checkpointing' if checkpointing else ''})")
    if kind == "capture_logits":
        # Logits are made 1024 positions at a time: bf16 logits, fp32 log-softmax and a masked copy for the
        # tail (~12 bytes a logit) of one chunk, plus the batch's hidden states and activations.
        logits = 12 * min(1024, getattr(config, "batch_size", 8) * seq) * arch.vocab
        logits += 34 * getattr(config, "batch_size", 8) * seq * arch.hidden
        return f"~{_bytes(2 * p + logits)} on one device (teacher inference)"
    if kind == "merge":
        return f"~{_bytes(2 * p)} RAM (one bf16 output shard buffer plus mmap'd inputs)"
    if kind == "eval":
        return f"~{_bytes(2 * p)}/device (bf16 inference)"
    if kind == "model":
        dtype = getattr(config, "dtype", "auto")
        dtype = arch.dtype if dtype in (None, "auto") else dtype
        return f"{_count(p)} params, {_bytes(BYTES_PER_PARAMETER.get(dtype, 2) * p)} in {dtype}"
    return "-"


def source_model(loaded, name: str) -> str | None:
    """The hub id or folder a stage's architecture comes from (following its first model input)."""
    seen = set()
    while name not in seen:
        seen.add(name)
        item = loaded.stages[name]
        if item.kind == "model":
            return item.config.model
        refs = list(item.inputs.values())
        if not refs:
            return None
        name = refs[0]
    return None


def estimates_for(loaded) -> dict[str, str]:
    """One estimate per stage of a loaded recipe; each model's architecture is read once."""
    architectures: dict[str, Architecture | None] = {}
    found = {}
    for name in loaded.order:
        item = loaded.stages[name]
        model = source_model(loaded, name)
        if model is not None and model not in architectures:
            architectures[model] = architecture_of(model, loaded.dir)
        arch = architectures.get(model) if model else None
        found[name] = (estimate(item.kind, item.config, arch, loaded.recipe.launch.num_processes) if arch
                       else "unknown architecture (no config.json offline)")
    return found
