"""What `distill` knows about its own runs, for plan, the console and the report. Never part of a key:
no stage module imports this file, so editing an estimate or a label rebuilds nothing."""
from __future__ import annotations

from typing import Any

from posttrain.training.memory_model import BYTES_PER_PARAMETER, Architecture, Launch, trainer_bytes, training_line

USES_LAUNCH = True  # a job of this kind runs on every process of the recipe's launch
HEADLINE_METRICS = ("final_train_loss", "final_eval_loss")
CURVES = {"loss": "train loss", "eval_loss": "eval loss", "kd_loss": "KD loss", "ce_loss": "CE loss"}


def chunked_logits(config: Any, tokens: int, width: int, arch: Architecture) -> dict[str, float]:
    # One chunk of logits at a time: the logits, the teacher-side log-softmax, probabilities and their
    # gradients, ~32 bytes a logit measured on CPU in fp32 (bench/plan_memory.py; 20 assumed before was
    # 27% low), +12 with the CE term; never [tokens x vocab].
    per_logit = (width + 28) + (12 if getattr(config, "alpha", 1.0) < 1 else 0)
    # The fused loss (kd/fused.py) works in half chunks at ~1.2x those bytes a logit.
    positions = (min(tokens, getattr(config, "chunk_size", 1024)) + 1) // 2
    master = BYTES_PER_PARAMETER.get(getattr(config, "master_weights", "float32"), 4)
    # The head's gradient, made in the forward with each chunk (kd/fused.py) and held until backward:
    # the whole head on every process, sharded or not.
    return {"logits (one chunk)": 1.2 * per_logit * positions * arch.vocab,
            "head gradient (fused loss)": master * arch.vocab * arch.hidden}


def memory_parts(config: Any, arch: Architecture, launch: Launch) -> dict[str, float]:
    return trainer_bytes(config, arch, launch, chunked_logits)


def memory_estimate(config: Any, arch: Architecture, launch: Launch) -> str:
    return training_line(config, arch, launch, memory_parts(config, arch, launch))
