"""The body of the SFT stage: data -> tokens with masked labels -> trl SFTTrainer -> HF folder."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from posttrain.core.context import StageContext
from posttrain.training.speed import choose_attention, speed_settings, torch_cuda_available
from posttrain.training.trainer_common import (callbacks, device_defaults, load_chat_tokenizer, logged_series,
                                               lora_config, save_model_entry, sharded)
from posttrain.training.trainer_common import train as train_model
from posttrain.console import tracker_callbacks  # wandb/mlflow/trackio runs named <recipe>/<stage>
from posttrain.training.splits import prepared_datasets

if TYPE_CHECKING:  # the config class, for the signature only (the stage module imports this one)
    from posttrain.kinds.sft.stage import SFTStageConfig


def run_sft(config: SFTStageConfig, ctx: StageContext) -> dict[str, Any]:
    from trl import SFTConfig, SFTTrainer

    from posttrain.hf.weights import load_trainable

    source = ctx.inputs["model"].path
    tokenizer = load_chat_tokenizer(source, config.chat_template, ctx)
    train, evaluation, metrics = prepared_datasets(ctx, tokenizer)
    # Per-sample lengths and label counts, from one Arrow column each (never the rows as Python lists).
    lengths = np.asarray(train.data.column("length"), dtype=np.int64)
    label_tokens = int(np.asarray(train.data.column("label_tokens"), dtype=np.int64).sum())
    if config.packing:
        train, evaluation = _packed(train, config.data.max_length, ctx), _packed(evaluation, config.data.max_length, ctx)
    model = load_trainable(source, config.master_weights)
    choose_attention(model, config.attn_implementation)
    checkpoints = ctx.work_dir / "checkpoints"
    training = speed_settings(device_defaults(dict(config.training), evaluation is not None), torch_cuda_available())
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
        # Tokenised, masked, cut (and packed) when the data was prepared: trl only collates.
        dataset_kwargs={"skip_prepare_dataset": True},
        **training,
    )
    trainer = sharded(SFTTrainer)(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                         processing_class=tokenizer, peft_config=lora_config(config.lora), callbacks=callbacks(ctx) + tracker_callbacks(ctx))
    _, run_metrics = train_model(trainer, checkpoints)
    seconds = run_metrics["train_seconds"]

    trained = save_model_entry(trainer, tokenizer, ctx, lora=bool(config.lora), checkpoints=checkpoints)

    history = trainer.state.log_history
    epochs = float(trainer.state.epoch or 0)
    metrics.update(
        loss=logged_series(history, "loss"),
        eval_loss=logged_series(history, "eval_loss"),
        **run_metrics,
        tokens_seen=int(lengths.sum() * epochs),
        tokens_per_second=round(float(lengths.sum()) * epochs / max(seconds, 1e-9), 1),
        label_tokens=label_tokens,
        padding_fraction=_padding_fraction(lengths, args.per_device_train_batch_size, config.packing or config.padding_free),
        lora=bool(config.lora),
        gradient_checkpointing=bool(args.activation_checkpointing),
        master_weights=config.master_weights,
        torch_dtype=str(trained.config.dtype).replace("torch.", ""),
    )
    if metrics["eval_loss"]:
        metrics["final_eval_loss"] = metrics["eval_loss"][-1]["value"]
    return metrics


def _padding_fraction(lengths: np.ndarray, batch_size: int, no_padding: bool) -> float:
    """Share of pad tokens when consecutive samples are batched and padded to the longest."""
    if no_padding or not len(lengths):
        return 0.0
    whole = len(lengths) // batch_size * batch_size
    longest = lengths[:whole].reshape(-1, batch_size).max(axis=1).sum() * batch_size
    if whole < len(lengths):
        longest += lengths[whole:].max() * (len(lengths) - whole)
    return round(1 - float(lengths.sum()) / float(longest), 4)


def _packed(dataset, max_length: int, ctx: StageContext):
    """trl's best-fit packing into max_length rows; the result is cached in the work folder, so a
    resumed run packs no more."""
    if dataset is None:
        return None
    from trl.data_utils import pack_dataset

    name = "packed-" + dataset._fingerprint + ".arrow"
    return pack_dataset(dataset.select_columns(["input_ids", "labels"]), max_length, "bfd",
                        {"cache_file_name": str(ctx.work_dir / name)})
