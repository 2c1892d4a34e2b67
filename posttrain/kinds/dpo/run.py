"""The body of the DPO stage: preference data -> trl DPOTrainer -> full HF folder."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from posttrain.core.context import StageContext
from posttrain.training.speed import choose_attention, speed_settings, torch_cuda_available
from posttrain.training.trainer_common import (callbacks, device_defaults, load_chat_tokenizer, lora_config,
                                               save_model_entry, sharded)
from posttrain.training.trainer_common import train as train_model
from posttrain.console import tracker_callbacks  # wandb/mlflow/trackio runs named <recipe>/<stage>
from posttrain.training.splits import prepared_datasets
from posttrain.kinds.dpo.packed_pairs import install_packed_backbone, packed_collator, padding_fraction

if TYPE_CHECKING:  # the config class, for the signature only (the stage module imports this one)
    from posttrain.kinds.dpo.stage import DPOStageConfig

REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def preference_trainer(base):
    """trl's DPOTrainer over prepared pairs: prompt_ids/chosen_ids/rejected_ids are already made (with
    trl's own rule for where the completion starts) and the pairs whose prompt fills max_length left
    out, so trl's dataset preparation (a `map` over every pair) is skipped."""

    class PreparedDPOTrainer(base):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PreparedDPOTrainer


def pair_lengths(dataset) -> list[tuple[int, int]]:
    """(prompt + chosen, prompt + rejected) token counts of each prepared pair, in dataset order, read
    from the Arrow list lengths a batch at a time (the token lists themselves never become Python)."""
    import pyarrow.compute as pc

    lengths = []
    for table in dataset.with_format("arrow").iter(batch_size=8192):
        prompt, chosen, rejected = (pc.list_value_length(table[name]).to_pylist()
                                    for name in ("prompt_ids", "chosen_ids", "rejected_ids"))
        lengths += [(p + c, p + r) for p, c, r in zip(prompt, chosen, rejected)]
    return lengths


def run_dpo(config: DPOStageConfig, ctx: StageContext) -> dict[str, Any]:
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from posttrain.hf.weights import load_trainable

    source = ctx.inputs["model"].path
    tokenizer = load_chat_tokenizer(source, config.chat_template, ctx)
    train, evaluation, metrics = prepared_datasets(ctx, tokenizer)
    metrics["train_pairs"], metrics["eval_pairs"] = metrics.pop("train_samples"), metrics.pop("eval_samples")
    # Loaded from the registry folder, so the policy's name_or_path is a real path (trl derives a
    # reference from it when it needs one; an in-memory model would send it to the hub).
    model = load_trainable(source, config.master_weights)
    ref_model = None
    if "ref_model" in ctx.inputs:
        # Same dtype as the policy: at step 0 both must give identical log-probs.
        ref_model = load_trainable(ctx.inputs["ref_model"].path, config.master_weights)
    for network in (model, ref_model):
        if network is not None:
            choose_attention(network, config.attn_implementation)
            if config.padding_free:
                install_packed_backbone(network)
    checkpoints = ctx.work_dir / "checkpoints"
    training = speed_settings(device_defaults(dict(config.training), evaluation is not None), torch_cuda_available())
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
    collator = None
    if config.padding_free:
        collator = packed_collator(DataCollatorForPreference)(
            pad_token_id=tokenizer.pad_token_id, max_length=args.max_length, truncation_mode=args.truncation_mode,
            pad_to_multiple_of=args.pad_to_multiple_of)
    trainer = sharded(preference_trainer(DPOTrainer))(
        model=model, ref_model=ref_model, args=args, train_dataset=train, eval_dataset=evaluation,
        data_collator=collator, processing_class=tokenizer, peft_config=lora_config(config.lora),
        callbacks=callbacks(ctx) + tracker_callbacks(ctx))
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
        # The same names as the training series (rewards_accuracies, not rewards/accuracies).
        eval={key.replace("/", "_"): [{"step": h["step"], "value": h[f"eval_{key}"]} for h in history
                                      if f"eval_{key}" in h]
              for key in ("loss",) + REWARD_KEYS},
        **run_metrics,
        reference="adapter-disabled policy" if config.lora and ref_model is None
        else ("ref_model input" if ref_model is not None else "policy input"),
        precomputed_reference=bool(config.precompute_ref_log_probs),
        padding_free=config.padding_free,
        # What padded batches of this data carry in pads (the decoder skips them when padding_free).
        padding_fraction=padding_fraction(pair_lengths(train), args.per_device_train_batch_size),
        lora=bool(config.lora),
    )
    return metrics
