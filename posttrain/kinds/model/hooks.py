"""What `model` knows about its own entries, for plan, the console and the report. Never part of a key:
no stage module imports this file, so editing an estimate or a label rebuilds nothing."""
from __future__ import annotations

from typing import Any

from posttrain.training.memory_model import BYTES_PER_PARAMETER, Architecture, Launch, format_bytes, format_count

HEADLINE_METRICS: tuple[str, ...] = ()


def memory_estimate(config: Any, arch: Architecture, launch: Launch) -> str:
    dtype = getattr(config, "dtype", "auto")
    dtype = arch.dtype if dtype in (None, "auto") else dtype
    return f"{format_count(arch.parameters)} params, {format_bytes(BYTES_PER_PARAMETER.get(dtype, 2) * arch.parameters)} in {dtype}"
