"""What `eval` knows about its own runs, for plan, the console and the report. Never part of a key: no
stage module imports this file, so editing an estimate or a label rebuilds nothing."""
from __future__ import annotations

from typing import Any

from posttrain.training.memory_model import Architecture, Launch, format_bytes

HEADLINE_METRICS: tuple[str, ...] = ()


def memory_estimate(config: Any, arch: Architecture, launch: Launch) -> str:
    return f"~{format_bytes(2 * arch.parameters)}/device (bf16 inference)"
