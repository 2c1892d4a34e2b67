"""Which sharded engine a training stage runs under, and making FSDP2 really shard on a CPU.

accelerate switches a run to FSDP only on accelerator devices: on CPU processes (gloo) a launch with an
FSDP config exits 0 having trained plain DDP, because `AcceleratorState` keeps MULTI_CPU and drops the
plugin (checked with accelerate 1.16). torch's `fully_shard` itself works over gloo, so on CPU
processes posttrain turns the state to FSDP right after the Trainer builds its Accelerator; everything
after that (wrapping with `fully_shard`, sharded checkpoints, gathering the state dict, resuming) is
accelerate's and transformers' own FSDP2 code, the same that runs on GPUs. FSDP1 and DeepSpeed have no
such path on a CPU: asked for there, the stage stops with one line instead of training unsharded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from posttrain.core.errors import UserError

ENGINES = ("fsdp", "deepspeed")


@dataclass(frozen=True)
class Sharding:
    """What a run asked for: `engine` is "fsdp" or "deepspeed"; `version` is FSDP's (1 or 2)."""

    engine: str
    version: int | None = None
    source: str = ""  # where it was asked for, for messages

    def describe(self) -> str:
        return f"FSDP{self.version}" if self.engine == "fsdp" else "DeepSpeed"


def requested(args) -> Sharding | None:
    """The sharding a Trainer's arguments or the launcher's environment ask for (None: none)."""
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if plugin_args is not None:
        return Sharding("fsdp", int(plugin_args.get("fsdp_version", 1)), "the stage's training.fsdp")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return Sharding("fsdp", int(os.environ.get("FSDP_VERSION", "1")), "the accelerate config")
    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return Sharding("deepspeed", None, "the accelerate config")
    return None


def asked_in_settings(training: dict) -> Sharding | None:
    """The sharding a stage's `training:` settings or the launcher's environment ask for, read before
    any Trainer exists (transformers and accelerate fail on some CPU combinations with their own,
    less telling, errors)."""
    if training.get("fsdp"):
        config = training.get("fsdp_config") or {}
        return Sharding("fsdp", int(config.get("fsdp_version", config.get("version", 1))), "the stage's training.fsdp")
    if training.get("deepspeed"):
        return Sharding("deepspeed", None, "the stage's training.deepspeed")
    return requested(None)


def refuse_silent_fallback(training: dict) -> None:
    """Stop, with one line, a sharded engine asked for on CPU processes where it would run as DDP."""
    import torch

    asked = asked_in_settings(training)
    if asked is None or torch.cuda.is_available():
        return
    if asked.engine != "fsdp" or asked.version != 2:
        raise UserError(f"{asked.describe()} is asked for ({asked.source}) on CPU processes, where accelerate "
                        "would silently run plain DDP: use FSDP2 (fsdp_version: 2, e.g. "
                        "configs/accelerate/fsdp_cpu.yaml) or a GPU machine")


def sharded(trainer_class):
    """`trainer_class` whose Accelerator really shards when FSDP2 is asked for on CPU processes, and
    which refuses, with one line, a sharded engine that would silently fall back to DDP."""

    class Sharded(trainer_class):
        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            enable_on_cpu(self)

    Sharded.__name__ = Sharded.__qualname__ = trainer_class.__name__
    return Sharded


def enable_on_cpu(trainer) -> None:
    """Make a CPU run's Accelerator shard with FSDP2 when that was asked for (a no-op elsewhere)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    asked = requested(trainer.args)
    state = trainer.accelerator.state
    if asked is None or state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return  # nothing asked, or accelerate honoured it (a GPU run)
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise UserError(f"{asked.describe()} is asked for ({asked.source}) but this is a single-process run: "
                        "launch it with --launcher accelerate or torchrun, or drop the sharding settings")
    if asked.engine != "fsdp" or asked.version != 2:
        raise UserError(f"{asked.describe()} is asked for ({asked.source}) on CPU processes, where accelerate "
                        "would silently run plain DDP: use FSDP2 (fsdp_version: 2, e.g. "
                        "configs/accelerate/fsdp_cpu.yaml) or a GPU machine")
    plugin_args = trainer.args.fsdp_plugin_args
    plugin = FullyShardedDataParallelPlugin(**plugin_args) if plugin_args else FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def is_fsdp(trainer) -> bool:
    return bool(getattr(trainer, "is_fsdp_enabled", False))


def parameter_layout(model) -> dict[str, object]:
    """How the trained model's parameters are held on this rank: shard sizes prove the sharding."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    full = sum(p.numel() for p in params)
    return {"dtensor_parameters": sum(isinstance(p, DTensor) for p in params), "parameters": len(params),
            "local_numel": int(local), "full_numel": int(full)}
