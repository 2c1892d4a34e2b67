"""How training stages hold and store weights.

Training keeps fp32 master weights by default: AdamW on bf16 weights rounds away most small updates
(one step at lr 1e-5 changed 16% of a bf16 model's parameters, 100% of an fp32 one). With
`training.bf16: true` the Trainer computes in bf16 under autocast, as FSDP mixed precision does; pure
bf16 weights only when a stage asks for `master_weights: bfloat16`. Checkpoints are stored in the dtype
their input was stored in (the base entry's, which `base.dtype` sets), so a bf16 base gives bf16
folders like the Hub's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

MasterWeights = Literal["float32", "bfloat16"]


def stored_dtype(folder: Path) -> str | None:
    """The dtype a Hugging Face folder's config says its weights are stored in (None if unsaid)."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    value = config.get("dtype") or config.get("torch_dtype")
    return value if isinstance(value, str) and value != "auto" else None


def load_trainable(folder: Path, master_weights: MasterWeights = "float32"):
    """A causal LM from `folder` with its weights in `master_weights`, whatever dtype it was stored in."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, master_weights))


def cast_for_storage(model, dtype_name: str | None):
    """Cast a trained model to the storage dtype before saving (a no-op when it is already there)."""
    import torch

    if dtype_name is None:
        return model
    dtype = getattr(torch, dtype_name)
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype)
    model.config.dtype = dtype
    return model
