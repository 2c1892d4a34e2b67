"""What `recode_logits` knows about its own runs, for plan, the console and the report. Never part of a
key: no stage module imports this file, so editing an estimate or a label rebuilds nothing."""
from __future__ import annotations

from typing import Any

from posttrain.training.memory_model import Architecture, Launch

HEADLINE_METRICS = ("bytes_per_token",)


def memory_estimate(config: Any, arch: Architecture, launch: Launch) -> str:
    return "one shard's decoded targets in RAM (no teacher, no GPU)"
