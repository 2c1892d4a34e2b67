"""Optional fast paths of the trainers: torch.compile and Liger's kernels.

Both are plain TrainingArguments fields set under a stage's `training:`. They change how fast a stage
trains, not what it learns, so they are left out of entry keys (posttrain/keys.py SPEED_SETTINGS) and
recorded in the manifest. Liger's fused linear cross-entropy is never used: it replaces the model's
forward, where trl's fused head (sft, dpo) and the sparse-KD head (distill) already live; its layer
kernels (RMSNorm, RoPE, SwiGLU) are what it adds. They are Triton kernels, so CUDA only.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Any

log = logging.getLogger("posttrain.speed")

LIGER_INSTALL = "pip install 'posttrain[liger]'"


def speed_problems(training: dict[str, Any]) -> list[tuple[str, str]]:
    """Recipe problems with the speed settings of a stage's `training:` (dotted path, message)."""
    problems = []
    if training.get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        problems.append(("training.use_liger_kernel", f"needs the liger-kernel package ({LIGER_INSTALL})"))
    config = training.get("liger_kernel_config") or {}
    if isinstance(config, dict) and config.get("fused_linear_cross_entropy"):
        problems.append(("training.liger_kernel_config.fused_linear_cross_entropy",
                         "not supported: posttrain's own loss head replaces the model's forward; leave it out"))
    return problems


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def speed_settings(training: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """The stage's trainer settings as the trainer should get them on this machine."""
    training = dict(training)
    if training.get("use_liger_kernel"):
        if not cuda:
            # Operational, so a GPU recipe's tiny profile still runs on a CPU machine (CI), and learns the same.
            log.warning("training.use_liger_kernel: Liger's kernels need a CUDA GPU; this run goes without them")
            training.pop("use_liger_kernel")
            training.pop("liger_kernel_config", None)
        else:
            config = dict(training.get("liger_kernel_config") or {})
            training["liger_kernel_config"] = {**config, "fused_linear_cross_entropy": False}
    return training
