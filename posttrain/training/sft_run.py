"""The body of the SFT stage: data -> tokens with masked labels -> trl SFTTrainer -> HF folder."""
from __future__ import annotations

from typing import Any

from posttrain.data.sources import load_conversations, write_contamination_report
from posttrain.errors import UserError
from posttrain.context import StageContext
from posttrain.training.trainer_common import (callbacks, device_defaults, load_chat_tokenizer, logged_series,
                                               lora_config, save_model_entry)
from posttrain.training.trainer_common import train as train_model
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
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                         processing_class=tokenizer, peft_config=lora_config(config.lora), callbacks=callbacks(ctx))
    _, run_metrics = train_model(trainer, checkpoints)
    seconds = run_metrics["train_seconds"]

    trained = save_model_entry(trainer, tokenizer, ctx, lora=bool(config.lora), checkpoints=checkpoints)

    history = trainer.state.log_history
    lengths = [len(ids) for ids in train["input_ids"]]
    epochs = float(trainer.state.epoch or 0)
    metrics.update(
        loss=logged_series(history, "loss"),
        eval_loss=logged_series(history, "eval_loss"),
        **run_metrics,
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
        metrics["final_eval_loss"] = metrics["eval_loss"][-1]["value"]
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
