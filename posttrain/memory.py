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
# Activation bytes per token and hidden unit of one layer without checkpointing, at 16-bit width
# (Korthikanti et al. 2022: 34 x s x b x h, ignoring the attention-score term FlashAttention removes).
ACTIVATION_BYTES_PER_TOKEN_AND_HIDDEN = 34
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


@dataclass(frozen=True)
class Launch:
    """How a stage's processes hold the model: `engine` "fsdp" / "deepspeed" shard weights, gradients
    and optimizer state over the processes; "ddp" (or one process) keeps a whole copy in each."""

    processes: int = 1
    engine: str = "ddp"
    mixed_precision: bool = False

    @property
    def shards(self) -> int:
        return self.processes if self.engine in ("fsdp", "deepspeed") else 1


def launch_of(recipe_launch, recipe_dir: Path) -> Launch:
    """The engine and precision of a recipe's `launch:` (its accelerate config read with safe_load)."""
    import yaml

    engine, mixed = "ddp", False
    if recipe_launch.accelerate_config:
        path = Path(recipe_launch.accelerate_config)
        path = path if path.is_absolute() else recipe_dir / path
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            config = {}
        engine = {"FSDP": "fsdp", "DEEPSPEED": "deepspeed"}.get(str(config.get("distributed_type")), "ddp")
        if engine == "deepspeed" and (config.get("deepspeed_config") or {}).get("zero_stage", 3) < 3:
            engine = "ddp"  # ZeRO-1/2 shard optimizer state only; counted as replicated (an upper bound)
        mixed = str(config.get("mixed_precision", "no")) in ("bf16", "fp16")
    return Launch(recipe_launch.num_processes, engine, mixed)


def training_bytes(kind: str, config: Any, arch: Architecture, launch: Launch) -> dict[str, float]:
    """The parts of one training process's peak, in bytes (see the module docstring for the rules).

    Peak is the larger of the forward/backward peak (states + working copies + activations + logits)
    and the optimizer step's (states + AdamW's foreach temporaries, activations already freed).
    """
    p = arch.parameters
    training = dict(getattr(config, "training", {}) or {})
    mixed = launch.mixed_precision or bool(training.get("bf16")) or bool(training.get("fp16"))
    batch = int(training.get("per_device_train_batch_size", 8)) * (2 if kind == "dpo" else 1)
    data = getattr(config, "data", None)
    seq = getattr(data, "max_length", None) or getattr(config, "max_length", 2048)
    tokens = batch * seq
    checkpointing = bool(getattr(config, "gradient_checkpointing", False))
    master = BYTES_PER_PARAMETER.get(getattr(config, "master_weights", "float32"), 4)
    shards = launch.shards
    parts: dict[str, float] = {}
    if getattr(config, "lora", None):
        parts["frozen weights"] = master * p  # LoRA runs under DDP: a whole copy per process
        optimizer_step = 0.0
    else:
        parts["weights, grads, AdamW"] = (2 * master + 8) * p / shards
        optimizer_step = 2 * master * p / shards  # foreach sqrt/div temporaries the size of the params
        if mixed:
            # bf16 working copies: autocast's cache of every weight, or under FSDP the gathered layer and
            # the one prefetched (plus the root's embeddings and head).
            layer = p - arch.vocab * arch.hidden * (1 if arch.tied else 2)
            parts["bf16 working copy"] = (2 * p if shards == 1 else
                                          2 * (2 * layer / max(arch.layers, 1) + arch.vocab * arch.hidden))
    width = 2 if mixed else 4
    per_layer = (2 * tokens * arch.hidden * width / 2 if checkpointing
                 else ACTIVATION_BYTES_PER_TOKEN_AND_HIDDEN * tokens * arch.hidden * width / 2)
    parts["activations"] = arch.layers * per_layer + (
        ACTIVATION_BYTES_PER_TOKEN_AND_HIDDEN * tokens * arch.hidden * width / 2 if checkpointing else 0)
    if kind == "distill":
        # One chunk of logits at a time: the logits, the teacher-side log-softmax, probabilities and their
        # gradients, ~32 bytes a logit measured on CPU in fp32 (bench/plan_memory.py; 20 assumed before was
        # 27% low), +12 with the CE term; never [tokens x vocab].
        per_logit = (width + 28) + (12 if getattr(config, "alpha", 1.0) < 1 else 0)
        # The fused loss (kd/fused.py) works in half chunks at ~1.2x those bytes a logit.
        positions = (min(tokens, getattr(config, "chunk_size", 1024)) + 1) // 2
        parts["logits (one chunk)"] = 1.2 * per_logit * positions * arch.vocab
        # The head's gradient, made in the forward with each chunk (kd/fused.py) and held until backward:
        # the whole head on every process, sharded or not.
        parts["head gradient (fused loss)"] = master * arch.vocab * arch.hidden
    else:
        # The whole batch's logits (trl materialises [tokens x vocab]): the model's output, the loss's
        # fp32 log-softmax and gradients, and trl's entropy / accuracy metrics over the same logits: ~32
        # bytes a logit measured on CPU in fp32 (bench/plan_memory.py: sft 2.59 GB for 2048 x 32000).
        parts["logits"] = (width + 28) * tokens * arch.vocab
    if kind == "dpo" and not getattr(config, "precompute_ref_log_probs", True) and not getattr(config, "lora", None):
        parts["reference model"] = master * p / shards
    forward_backward = sum(parts.values())
    if optimizer_step and optimizer_step > forward_backward - parts["weights, grads, AdamW"]:
        parts = {"weights, grads, AdamW": parts["weights, grads, AdamW"], "optimizer step": optimizer_step,
                 **({"reference model": parts["reference model"]} if "reference model" in parts else {})}
    return parts


def estimate(kind: str, config: Any, arch: Architecture, launch: Launch | int) -> str:
    """A one-line estimate for one stage."""
    if isinstance(launch, int):
        launch = Launch(launch, "fsdp" if launch > 1 else "ddp")
    p = arch.parameters
    data = getattr(config, "data", None)
    seq = getattr(data, "max_length", None) or getattr(config, "max_length", None) or 2048
    if kind in ("sft", "dpo", "distill"):
        parts = training_bytes(kind, config, arch, launch)
        training = dict(getattr(config, "training", {}) or {})
        batch = int(training.get("per_device_train_batch_size", 8)) * (2 if kind == "dpo" else 1)
        checkpointing = bool(getattr(config, "gradient_checkpointing", False))
        shard = (f"{launch.engine} over {launch.processes}" if launch.shards > 1
                 else "whole copy per process" if launch.processes > 1 else "1 device")
        biggest = max(parts, key=parts.get)
        return (f"~{_bytes(sum(parts.values()))}/device ({_count(p)} params, {shard}, batch {batch} x {seq}"
                f"{', checkpointing' if checkpointing else ''}; largest: {biggest} {_bytes(parts[biggest])})")
    if kind == "capture_logits":
        # Logits are made 1024 positions at a time: bf16 logits, fp32 log-softmax and a masked copy for the
        # tail (~12 bytes a logit) of one chunk, plus the batch's hidden states and activations.
        logits = 12 * min(1024, getattr(config, "batch_size", 8) * seq) * arch.vocab
        logits += 34 * getattr(config, "batch_size", 8) * seq * arch.hidden
        return f"~{_bytes(2 * p + logits)} on one device (teacher inference)"
    if kind == "recode_logits":
        return "one shard's decoded targets in RAM (no teacher, no GPU)"
    if kind == "merge":
        dtype = getattr(config, "dtype", None) or "bfloat16"
        size = BYTES_PER_PARAMETER.get(dtype, 2)
        return f"~{_bytes(size * p)} RAM (one {dtype} output shard buffer plus mmap'd inputs)"
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
    launch = launch_of(loaded.recipe.launch, loaded.dir)
    for name in loaded.order:
        item = loaded.stages[name]
        model = source_model(loaded, name)
        if model is not None and model not in architectures:
            architectures[model] = architecture_of(model, loaded.dir)
        arch = architectures.get(model) if model else None
        found[name] = (estimate(item.kind, item.config, arch, launch) if arch
                       else "unknown architecture (no config.json offline)")
    return found
