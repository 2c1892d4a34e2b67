"""The body of the SFT stage: data -> tokens with masked labels -> trl SFTTrainer -> HF folder."""
from __future__ import annotations

import shutil
import time
from typing import Any

from posttrain.data.sources import load_conversations, write_contamination_report
from posttrain.errors import UserError
from posttrain.stages.base import StageContext
from posttrain.training.checkpoints import (last_complete_checkpoint, mean_train_loss, no_final_checkpoint,
                                             progress_to)
from posttrain.training.splits import train_and_eval
from posttrain.training.tokenize import IGNORE, tokenize_row


def build_dataset(config, tokenizer, ctx: StageContext):
    """Tokenised train (and eval) datasets plus data metrics."""
    rows, stats = load_conversations(config.data, ctx.recipe_dir, ctx.seed)
    write_contamination_report(stats, ctx.out_dir)
    records, counts = _tokenize(rows, config, tokenizer, stats["sources"])
    if not records:
        raise UserError(f"no training samples left after dropping over-long rows from {_labels(config)} "
                        "(raise data.max_length)")
    stats.update(truncated_samples=counts["truncated"], dropped_samples=counts["dropped"])
    dataset, eval_dataset = train_and_eval(records, config.data, ctx, load_conversations,
                                           lambda rows: _tokenize(rows, config, tokenizer)[0])
    stats["train_samples"] = len(dataset)
    stats["eval_samples"] = len(eval_dataset) if eval_dataset is not None else 0
    return dataset, eval_dataset, stats


def _labels(config) -> str:
    return ", ".join(source.label for source in config.data.sources)


def _tokenize(rows: list[dict], config, tokenizer, per_source: list[dict] | None = None
              ) -> tuple[list[dict], dict[str, int]]:
    """Token ids and labels; counts truncated and dropped rows in total and, given `per_source` (the
    data layer's per-source stats), for each source."""
    records, counts = [], {"truncated": 0, "dropped": 0}
    for source in per_source or []:
        source.update(truncated=0, dropped=0)
    for row in rows:
        ids, labels, was_truncated = tokenize_row(tokenizer, row, config.data.max_length, config.assistant_only_loss)
        outcome = None
        if was_truncated and config.data.overlong == "drop":
            outcome = "dropped"
        elif all(label == IGNORE for label in labels):
            outcome = "dropped"  # truncation cut every assistant token: nothing to learn from
        elif was_truncated:
            outcome = "truncated"
        if outcome:
            counts[outcome] += 1
            if per_source and "source" in row:
                per_source[row["source"]][outcome] += 1
        if outcome == "dropped":
            continue
        records.append({"input_ids": ids, "labels": labels})
    return records, counts


def load_chat_tokenizer(source, chat_template: str | None, ctx: StageContext):
    """The input's tokenizer, with the stage's template (and its EOS) attached when one is given."""
    from transformers import AutoTokenizer

    from posttrain.chat_templates import resolve_chat_template

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

    Under a multi-process launch every rank takes part (FSDP and ZeRO-3 gather the full state dict
    collectively) and the Trainer writes on rank 0 only. Returns the saved model.
    """
    from posttrain.checkpoint_folder import save_tokenizer_files
    from posttrain.training.weights import cast_for_storage, stored_dtype

    model = trainer.model
    storage = stored_dtype(ctx.inputs["model"].path)
    if lora:
        if ctx.world_size > 1:
            raise UserError("LoRA with a multi-process launch is not supported yet: run LoRA stages in one process")
        model.save_pretrained(ctx.out_dir / "adapter")
        model = cast_for_storage(model.merge_and_unload(), storage)
        model.save_pretrained(ctx.out_dir, safe_serialization=True)
    elif ctx.world_size > 1:
        trainer.save_model(str(ctx.out_dir))  # sharded weights are gathered in their training dtype
    else:
        model = cast_for_storage(model, storage)
        model.save_pretrained(ctx.out_dir, safe_serialization=True)
    if ctx.is_main:
        save_tokenizer_files(ctx.out_dir, tokenizer, input_dir=ctx.inputs["model"].path)
        for leftover in ("training_args.bin",):  # a pickle the Trainer writes: never in the registry
            (ctx.out_dir / leftover).unlink(missing_ok=True)
        runs = checkpoints / "runs"
        if runs.is_dir():
            shutil.copytree(runs, ctx.out_dir / "tensorboard", dirs_exist_ok=True)
    return model


def run_sft(config, ctx: StageContext) -> dict[str, Any]:
    from trl import SFTConfig, SFTTrainer

    from posttrain.training.weights import load_trainable

    source = ctx.inputs["model"].path
    tokenizer = load_chat_tokenizer(source, config.chat_template, ctx)
    train, evaluation, metrics = build_dataset(config, tokenizer, ctx)
    model = load_trainable(source, config.master_weights)
    checkpoints = ctx.work_dir / "checkpoints"
    training = device_defaults(dict(config.training), evaluation is not None)
    args = SFTConfig(
        output_dir=str(checkpoints),
        seed=ctx.seed,
        # Samples are already cut to data.max_length above; with packing it is also the packed length.
        # trl refuses a max_length it would not enforce (padding-free without packing).
        max_length=None if config.padding_free and not config.packing else config.data.max_length,
        packing=config.packing,
        padding_free=config.padding_free,
        # trl turns checkpointing on by default; ours is explicit (and uses the non-deprecated name).
        activation_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing=None,
        save_strategy="steps",
        save_steps=config.save_steps,
        **training,
    )
    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                                 target_modules=config.lora.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[no_final_checkpoint(), progress_to(ctx)])
    last = last_complete_checkpoint(checkpoints)
    started = time.time()
    output = trainer.train(resume_from_checkpoint=str(last) if last else None)
    seconds = time.time() - started

    trained = save_model_entry(trainer, tokenizer, ctx, lora=bool(config.lora), checkpoints=checkpoints)

    history = trainer.state.log_history
    lengths = [len(ids) for ids in train["input_ids"]]
    epochs = float(trainer.state.epoch or 0)
    metrics.update(
        loss=[{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        eval_loss=[{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        final_train_loss=mean_train_loss(trainer.state.log_history, output.training_loss),
        steps=trainer.state.global_step,
        train_seconds=round(seconds, 3),
        resumed_from_step=int(last.name.rsplit("-", 1)[1]) if last else 0,
        tokens_seen=int(sum(lengths) * epochs),
        tokens_per_second=round(sum(lengths) * epochs / max(seconds, 1e-9), 1),
        label_tokens=int(sum(sum(1 for t in labels if t != IGNORE) for labels in train["labels"])),
        padding_fraction=_padding_fraction(lengths, args.per_device_train_batch_size, config.packing or config.padding_free),
        lora=bool(config.lora),
        gradient_checkpointing=bool(args.activation_checkpointing),
        master_weights=config.master_weights,
        torch_dtype=str(next(trained.parameters()).dtype).replace("torch.", ""),
    )
    if metrics["eval_loss"]:
        metrics["final_eval_loss"] = metrics["eval_loss"][-1]["eval_loss"]
    return metrics


def _padding_fraction(lengths: list[int], batch_size: int, no_padding: bool) -> float:
    """Share of pad tokens when consecutive samples are batched and padded to the longest."""
    if no_padding or not lengths:
        return 0.0
    padded = real = 0
    for i in range(0, len(lengths), batch_size):
        batch = lengths[i:i + batch_size]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return round(1 - real / padded, 4)
