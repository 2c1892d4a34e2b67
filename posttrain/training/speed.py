"""Optional fast paths of the trainers: the attention kernel, torch.compile and Liger's kernels.

`attn_implementation` is a stage setting; the other two are plain TrainingArguments fields set under a
stage's `training:`. They change how fast a stage trains, not what it learns, so they are left out of
entry keys (posttrain/planning/stage_keys.py SPEED_SETTINGS) and recorded in the manifest. Liger's fused linear cross-entropy is never used: it replaces the model's
forward, where trl's fused head (sft, dpo) and the sparse-KD head (distill) already live; its layer
kernels (RMSNorm, RoPE, SwiGLU) are what it adds. They are Triton kernels, so CUDA only.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Any

from pydantic import Field

from posttrain.core.errors import UserError
from posttrain.core.strict import StrictModel

log = logging.getLogger("posttrain.speed")


class AttentionChoice(StrictModel):
    """The attention kernel of a training stage's model (sft, dpo, distill)."""

    attn_implementation: str | None = Field(
        None, description="transformers' attention kernel: sdpa (its default), eager, flash_attention_2, "
                          "flash_attention_3, flex_attention, or a kernels-hub name. Padding-free and packed "
                          "batches need a variable-length kernel (flash_attention_*) to save attention time.")


def choose_attention(model, name: str | None) -> None:
    """Switch a loaded model to the recipe's attention kernel; one clear error when this machine lacks it."""
    if name is None:
        return
    try:
        model.set_attn_implementation(name)
    except (ImportError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"attn_implementation: {name!r} cannot be used here: {first_line}") from None

LIGER_INSTALL = "pip install 'posttrain[liger]'"


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def speed_problems(training: dict[str, Any]) -> list[tuple[str, str]]:
    """Recipe problems with the speed settings of a stage's `training:` (dotted path, message)."""
    problems = []
    if training.get("use_liger_kernel") and not liger_installed():
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
