"""What `capture_logits` knows about its own runs, for plan, the console and the report. Never part of a
key: no stage module imports this file, so editing an estimate or a label rebuilds nothing."""
from __future__ import annotations

from typing import Any

from posttrain.training.memory_model import Architecture, Launch, format_bytes, sequence_length

HEADLINE_METRICS = ("bytes_per_token",)


def memory_estimate(config: Any, arch: Architecture, launch: Launch) -> str:
    # Logits are made 1024 positions at a time: bf16 logits, fp32 log-softmax and a masked copy for the
    # tail (~12 bytes a logit) of one chunk, plus the batch's hidden states and activations.
    seq = sequence_length(config)
    logits = 12 * min(1024, getattr(config, "batch_size", 8) * seq) * arch.vocab
    logits += 34 * getattr(config, "batch_size", 8) * seq * arch.hidden
    return f"~{format_bytes(2 * arch.parameters + logits)} on one device (teacher inference)"
