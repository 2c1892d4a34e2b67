"""The body of the DPO stage: preference data -> trl DPOTrainer -> full HF folder."""
from __future__ import annotations

import json
from typing import Any

from posttrain.data.sources import load_preferences, write_contamination_report
from posttrain.errors import UserError
from posttrain.context import StageContext
from posttrain.training.trainer_common import (callbacks, device_defaults, load_chat_tokenizer, lora_config,
                                               save_model_entry)
from posttrain.training.trainer_common import train as train_model
from posttrain.training.splits import train_and_eval
from posttrain.training.tokenize import chat_token_ids

REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def build_preference_datasets(config, tokenizer, ctx: StageContext):
    if not tokenizer.chat_template:
        raise UserError("the model's tokenizer has no chat template; set base.chat_template (e.g. llama-3.1) "
                        "or the stage's chat_template")
    rows, stats = load_preferences(config.data, ctx.recipe_dir, ctx.seed)
    write_contamination_report(stats, ctx.out_dir)
    kept, counts = _filter_overlong(rows, config, tokenizer)
    if not kept:
        raise UserError("no preference pairs left after dropping over-long rows (raise data.max_length)")
    stats.update(truncated_samples=counts["truncated"], dropped_samples=counts["dropped"])
    dataset, evaluation = train_and_eval(kept, config.data, ctx, load_preferences,
                                         lambda rows: _filter_overlong(rows, config, tokenizer)[0])
    stats["train_pairs"] = len(dataset)
    stats["eval_pairs"] = len(evaluation) if evaluation is not None else 0
    return dataset, evaluation, stats


def _filter_overlong(rows: list[dict], config, tokenizer) -> tuple[list[dict], dict[str, int]]:
    """Count pairs longer than max_length (trl truncates them); drop them if the recipe says so."""
    kept, counts = [], {"truncated": 0, "dropped": 0}
    for row in rows:
        longest = max(len(chat_token_ids(tokenizer, row["prompt"] + row[side])) for side in ("chosen", "rejected"))
        if longest > config.data.max_length:
            if config.data.overlong == "drop":
                counts["dropped"] += 1
                continue
            counts["truncated"] += 1
        kept.append({key: row[key] for key in ("prompt", "chosen", "rejected")})
    return kept, counts


def run_dpo(config, ctx: StageContext) -> dict[str, Any]:
    from trl import DPOConfig, DPOTrainer

    from posttrain.training.weights import load_trainable

    source = ctx.inputs["model"].path
    tokenizer = load_chat_tokenizer(source, config.chat_template, ctx)
    train, evaluation, metrics = build_preference_datasets(config, tokenizer, ctx)
    # Loaded from the registry folder, so the policy's name_or_path is a real path (trl derives a
    # reference from it when it needs one; an in-memory model would send it to the hub).
    model = load_trainable(source, config.master_weights)
    ref_model = None
    if "ref_model" in ctx.inputs:
        # Same dtype as the policy: at step 0 both must give identical log-probs.
        ref_model = load_trainable(ctx.inputs["ref_model"].path, config.master_weights)
    checkpoints = ctx.work_dir / "checkpoints"
    training = device_defaults(dict(config.training), evaluation is not None)
    args = DPOConfig(
        output_dir=str(checkpoints),
        seed=ctx.seed,
        max_length=config.data.max_length,
        beta=config.beta,
        loss_type=config.loss_type,
        loss_weights=config.loss_weights,
        label_smoothing=config.label_smoothing,
        precompute_ref_log_probs=config.precompute_ref_log_probs,
        save_strategy="steps",
        save_steps=config.save_steps,
        activation_checkpointing=config.gradient_checkpointing,  # trl's default is on; ours is explicit
        gradient_checkpointing=None,
        **training,
    )
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train, eval_dataset=evaluation,
                         processing_class=tokenizer, peft_config=lora_config(config.lora), callbacks=callbacks(ctx))
    _, run_metrics = train_model(trainer, checkpoints)

    save_model_entry(trainer, tokenizer, ctx, lora=bool(config.lora), checkpoints=checkpoints)
    if ctx.is_main:
        if "ref_chosen_logps" in trainer.train_dataset.column_names:
            # Kept so the reference side of every pair can be audited against the reference model.
            ref = trainer.train_dataset.select_columns(["ref_chosen_logps", "ref_rejected_logps"]).to_list()
            (ctx.out_dir / "reference_logps.json").write_text(json.dumps(ref))
    history = trainer.state.log_history
    series = {key: [{"step": h["step"], "value": h[key]} for h in history if key in h and "eval_loss" not in h]
              for key in ("loss",) + REWARD_KEYS}
    metrics.update(
        {key.replace("/", "_"): value for key, value in series.items()},
        eval={key: [{"step": h["step"], "value": h[f"eval_{key}"]} for h in history if f"eval_{key}" in h]
              for key in ("loss",) + REWARD_KEYS},
        **run_metrics,
        reference="adapter-disabled policy" if config.lora and ref_model is None
        else ("ref_model input" if ref_model is not None else "policy input"),
        precomputed_reference=bool(config.precompute_ref_log_probs),
        lora=bool(config.lora),
    )
    return metrics
