"""What `dpo` knows about its own runs, for plan, the console and the report. Never part of a key: no
stage module imports this file, so editing an estimate or a label rebuilds nothing."""
from __future__ import annotations

from typing import Any

from posttrain.training.memory_model import (BYTES_PER_PARAMETER, Architecture, Launch, trainer_bytes, training_line,
                                             whole_batch_logits)

USES_LAUNCH = True  # a job of this kind runs on every process of the recipe's launch
HEADLINE_METRICS = ("final_train_loss", "final_eval_loss")
CURVES = {"loss": "train loss", "eval_loss": "eval loss", "rewards_margins": "reward margin",
          "rewards_accuracies": "preference accuracy"}
ROWS_PER_PAIR = 2  # chosen and rejected


def memory_parts(config: Any, arch: Architecture, launch: Launch) -> dict[str, float]:
    extra = {}
    if not getattr(config, "precompute_ref_log_probs", True) and not getattr(config, "lora", None):
        master = BYTES_PER_PARAMETER.get(getattr(config, "master_weights", "float32"), 4)
        extra["reference model"] = master * arch.parameters / launch.shards
    return trainer_bytes(config, arch, launch, whole_batch_logits, ROWS_PER_PAIR, extra)


def memory_estimate(config: Any, arch: Architecture, launch: Launch) -> str:
    return training_line(config, arch, launch, memory_parts(config, arch, launch), ROWS_PER_PAIR)
