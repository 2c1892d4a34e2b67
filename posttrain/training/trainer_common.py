"""Trainer plumbing every training stage (sft, dpo, distill) shares: the input's tokenizer with its
template, device defaults, LoRA settings, the callbacks, training with resume from the last complete
in-stage checkpoint, the metrics every run reports, and saving the entry."""
from __future__ import annotations

import shutil
import time
from typing import Any

from posttrain.core.context import StageContext
from posttrain.core.errors import UserError
from posttrain.training.sharding import is_fsdp, refuse_silent_fallback, sharded  # noqa: F401 - kept: deleting changes stage keys
from posttrain.training.checkpoints import last_complete_checkpoint, mean_train_loss, processes_that_wrote, no_final_checkpoint, progress_to


def load_chat_tokenizer(source, chat_template: str | None, ctx: StageContext):
    """The input's tokenizer, with the stage's template (and its EOS) attached when one is given."""
    from transformers import AutoTokenizer

    from posttrain.hf.chat_templates import resolve_chat_template

    tokenizer = AutoTokenizer.from_pretrained(source)
    if chat_template:
        template = resolve_chat_template(chat_template, ctx.recipe_dir)
        tokenizer.chat_template = template.text
        if template.end_of_turn:
            tokenizer.eos_token = template.end_of_turn
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def device_defaults(training: dict[str, Any], has_eval: bool) -> dict[str, Any]:
    """Defaults for any trl trainer; the recipe's `training:` values always win."""
    import torch

    refuse_silent_fallback(training)
    training.setdefault("logging_steps", 1)
    training.setdefault("report_to", ["tensorboard"])
    training.setdefault("save_total_limit", 2)
    if has_eval:
        training.setdefault("eval_strategy", "epoch")
    if not torch.cuda.is_available():
        # trl defaults to bf16, which the Trainer refuses on a CPU unless told it is a CPU run.
        training.setdefault("use_cpu", True)
        training.setdefault("bf16", False)
    return training


def save_model_entry(trainer, tokenizer, ctx: StageContext, lora: bool, checkpoints) -> Any:
    """Write the trained model as a plain HF folder (LoRA merged; adapter kept in adapter/), in the
    dtype the input model was stored in (training itself keeps fp32 master weights).

    Under a multi-process launch every rank takes part in gathering the full state dict (FSDP and
    ZeRO-3 hold only shards), and rank 0 alone casts and writes it: the folder has the layout and
    dtype of a single-process entry and nothing of the optimizer. Returns the saved model (rank 0's).
    """
    from posttrain.hf.checkpoint_folder import save_tokenizer_files
    from posttrain.hf.weights import cast_for_storage, stored_dtype

    storage = stored_dtype(ctx.inputs["model"].path)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if lora:
        if is_fsdp(trainer) or trainer.is_deepspeed_enabled:
            raise UserError("LoRA under FSDP or DeepSpeed is not supported yet: launch LoRA stages with DDP "
                            "(configs/accelerate/ddp.yaml, or torchrun); only the small adapter is trained")
        if ctx.is_main:  # under DDP every rank holds the same weights
            model.save_pretrained(ctx.out_dir / "adapter")
            model = cast_for_storage(model.merge_and_unload(), storage)
            model.save_pretrained(ctx.out_dir, safe_serialization=True)
    elif ctx.world_size > 1:
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # a collective: every rank
        if ctx.is_main:
            save_full_state(model, state, storage, ctx.out_dir)
    else:
        model = cast_for_storage(model, storage)
        model.save_pretrained(ctx.out_dir, safe_serialization=True)
    if ctx.is_main:
        save_tokenizer_files(ctx.out_dir, tokenizer, input_dir=ctx.inputs["model"].path)
        runs = checkpoints / "runs"
        if runs.is_dir():
            shutil.copytree(runs, ctx.out_dir / "tensorboard", dirs_exist_ok=True)
    return model


def save_full_state(model, state: dict, storage: str | None, out_dir) -> None:
    """Rank 0's write of a gathered state dict as the model's HF folder, cast to the storage dtype."""
    import torch

    dtype = getattr(torch, storage) if storage else None
    if dtype is not None:
        state = {name: value.to(dtype) if value.is_floating_point() else value for name, value in state.items()}
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    if dtype is not None:
        # save_pretrained writes the dtype of the (fp32, sharded) parameters it holds, not of `state`.
        model.config.dtype = dtype
        model.config.save_pretrained(out_dir)


def lora_config(settings):
    """peft's LoraConfig from the stage's `lora:` settings, or None without them."""
    if not settings:
        return None
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=settings.target_modules, task_type="CAUSAL_LM")


def callbacks(ctx: StageContext) -> list:
    """No checkpoint at the last step (the entry is saved right after), progress for the console."""
    return [no_final_checkpoint(), progress_to(ctx)]


def train(trainer, checkpoints) -> tuple[Any, dict[str, Any]]:
    """Train, resuming from the last complete in-stage checkpoint if a killed run left one; returns the
    Trainer's output and the metrics every training stage reports."""
    processes = trainer.accelerator.num_processes
    last = last_complete_checkpoint(checkpoints, processes)
    if last is not None and processes_that_wrote(last) != processes:
        # Sharded weights and optimizer state only load into the layout that wrote them.
        raise UserError(f"the in-stage checkpoint {last} was written by {processes_that_wrote(last)} "
                        f"process(es) and this run has {processes}: resume with the same launch, or "
                        f"delete {checkpoints} to start the stage over")
    started = time.time()
    output = trainer.train(resume_from_checkpoint=str(last) if last else None)
    seconds = time.time() - started
    return output, {
        "final_train_loss": mean_train_loss(trainer.state.log_history, output.training_loss),
        "steps": trainer.state.global_step,
        "resumed_from_step": int(last.name.rsplit("-", 1)[1]) if last else 0,
        "train_seconds": round(seconds, 3),
        "sharding": sharding_metrics(trainer),
    }


def sharding_metrics(trainer) -> dict[str, Any]:
    """How the run was spread over processes, with rank 0's parameter shard sizes as the proof."""
    from posttrain.training.sharding import parameter_layout

    world = trainer.accelerator.num_processes
    engine = ("fsdp2" if is_fsdp(trainer) and trainer.accelerator.is_fsdp2 else "fsdp1" if is_fsdp(trainer)
              else "deepspeed" if trainer.is_deepspeed_enabled else "ddp" if world > 1 else "none")
    return {"engine": engine, "processes": world, **parameter_layout(trainer.model)}


def logged_series(history: list[dict], key: str) -> list[dict[str, float]]:
    """One metric's points from the Trainer's log history, in the one shape every series has."""
    return [{"step": h["step"], "value": h[key]} for h in history if key in h]
