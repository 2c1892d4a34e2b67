"""What `sft` knows about its own runs, for plan, the console and the report. Never part of a key: no
stage module imports this file, so editing an estimate or a label rebuilds nothing."""
from __future__ import annotations

from typing import Any

from posttrain.training.memory_model import Architecture, Launch, trainer_bytes, training_line, whole_batch_logits

USES_LAUNCH = True  # a job of this kind runs on every process of the recipe's launch
HEADLINE_METRICS = ("final_train_loss", "final_eval_loss")
CURVES = {"loss": "train loss", "eval_loss": "eval loss"}


def memory_parts(config: Any, arch: Architecture, launch: Launch) -> dict[str, float]:
    return trainer_bytes(config, arch, launch, whole_batch_logits)


def memory_estimate(config: Any, arch: Architecture, launch: Launch) -> str:
    return training_line(config, arch, launch, memory_parts(config, arch, launch))
