"""The memory model behind `posttrain plan`: architectures, launches and the bytes a trainer holds.

Each kind's hooks (`kinds/<kind>/hooks.py`) build its estimate from these parts; `planning/memory.py`
finds the architecture and launch and asks each stage.

Rules of thumb (documented, not measured): full fine-tuning with AdamW in mixed precision keeps 16
bytes per parameter (bf16 weights and grads, fp32 master weights and two moments), sharded over the
processes under FSDP / ZeRO-3; activations with gradient checkpointing keep one hidden-state tensor per
layer plus one layer's working set (~34 bytes x tokens x hidden, Korthikanti et al. 2022) and the
logits; LoRA keeps frozen bf16 weights (2 bytes per parameter) plus the adapter; inference 2 bytes per
parameter. Estimates are for planning, not guarantees.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

GIB = 1024 ** 3
# Activation bytes per token and hidden unit of one layer without checkpointing, at 16-bit width
# (Korthikanti et al. 2022: 34 x s x b x h, ignoring the attention-score term FlashAttention removes).
ACTIVATION_BYTES_PER_TOKEN_AND_HIDDEN = 34
BYTES_PER_PARAMETER = {"float32": 4, "bfloat16": 2, "float16": 2}


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


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2)):
        if n >= size or unit == "MiB":
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def format_count(n: float) -> str:
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



# The head's part of a training step: (config, tokens, working width in bytes, architecture) -> parts.
HeadParts = Callable[[Any, int, int, Architecture], dict[str, float]]


def batch_and_length(config: Any, rows_per_sample: int = 1) -> tuple[int, int]:
    """(sequences per device step, tokens per sequence) of a training stage's config."""
    training = dict(getattr(config, "training", {}) or {})
    batch = int(training.get("per_device_train_batch_size", 8)) * rows_per_sample
    data = getattr(config, "data", None)
    return batch, getattr(data, "max_length", None) or getattr(config, "max_length", None) or 2048


def whole_batch_logits(config: Any, tokens: int, width: int, arch: Architecture) -> dict[str, float]:
    """The whole batch's logits (trl materialises [tokens x vocab]): the model's output, the loss's fp32
    log-softmax and gradients, and trl's entropy / accuracy metrics over the same logits: ~32 bytes a
    logit measured on CPU in fp32 (bench/plan_memory.py: sft 2.59 GB for 2048 x 32000)."""
    return {"logits": (width + 28) * tokens * arch.vocab}


def trainer_bytes(config: Any, arch: Architecture, launch: Launch, head: HeadParts, rows_per_sample: int = 1,
                  extra: dict[str, float] | None = None) -> dict[str, float]:
    """The parts of one training process's peak, in bytes (see the module docstring for the rules):
    weights, gradients and AdamW state, working copies, activations, the kind's `head` parts and its
    `extra` parts (a reference model).

    Peak is the larger of the forward/backward peak (states + working copies + activations + logits)
    and the optimizer step's (states + AdamW's foreach temporaries, activations already freed).
    """
    p = arch.parameters
    training = dict(getattr(config, "training", {}) or {})
    mixed = launch.mixed_precision or bool(training.get("bf16")) or bool(training.get("fp16"))
    batch, seq = batch_and_length(config, rows_per_sample)
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
    parts.update(head(config, tokens, width, arch))
    parts.update(extra or {})
    forward_backward = sum(parts.values())
    if optimizer_step and optimizer_step > forward_backward - parts["weights, grads, AdamW"]:
        parts = {"weights, grads, AdamW": parts["weights, grads, AdamW"], "optimizer step": optimizer_step,
                 **({"reference model": parts["reference model"]} if "reference model" in parts else {})}
    return parts


def training_line(config: Any, arch: Architecture, launch: Launch, parts: dict[str, float], rows_per_sample: int = 1) -> str:
    """A training stage's one-line estimate from its parts."""
    batch, seq = batch_and_length(config, rows_per_sample)
    checkpointing = bool(getattr(config, "gradient_checkpointing", False))
    shard = (f"{launch.engine} over {launch.processes}" if launch.shards > 1
             else "whole copy per process" if launch.processes > 1 else "1 device")
    biggest = max(parts, key=parts.get)
    return (f"~{format_bytes(sum(parts.values()))}/device ({format_count(arch.parameters)} params, {shard}, "
            f"batch {batch} x {seq}{', checkpointing' if checkpointing else ''}; largest: {biggest} "
            f"{format_bytes(parts[biggest])})")


def sequence_length(config: Any) -> int:
    """Tokens per sequence of any stage's config (its data's max_length, its own, or 2048)."""
    data = getattr(config, "data", None)
    return getattr(data, "max_length", None) or getattr(config, "max_length", None) or 2048
