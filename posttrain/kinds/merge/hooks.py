"""What `merge` knows about its own runs, for plan, the console and the report. Never part of a key: no
stage module imports this file, so editing an estimate or a label rebuilds nothing."""
from __future__ import annotations

from typing import Any

from posttrain.training.memory_model import BYTES_PER_PARAMETER, Architecture, Launch, format_bytes

HEADLINE_METRICS: tuple[str, ...] = ()


def memory_estimate(config: Any, arch: Architecture, launch: Launch) -> str:
    dtype = getattr(config, "dtype", None) or "bfloat16"
    size = BYTES_PER_PARAMETER.get(dtype, 2)
    return f"~{format_bytes(size * arch.parameters)} RAM (one {dtype} output shard buffer plus mmap'd inputs)"
