"""The body of the distill stage: a transformers Trainer whose loss is the chunked sparse-KD loss."""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from posttrain.kd.fused import fused_distill_loss
from posttrain.hf.tokenizer_check import check_compatible
from posttrain.core.errors import UserError
from posttrain.core.context import StageContext
from posttrain.training.speed import choose_attention, speed_settings, torch_cuda_available
from posttrain.training.trainer_common import (callbacks, device_defaults, load_chat_tokenizer, logged_series,
                                               save_model_entry, sharded)
from posttrain.training.trainer_common import train as train_model
from posttrain.console import tracker_callbacks  # wandb/mlflow/trackio runs named <recipe>/<stage>
from posttrain.kinds.distill.data import (LengthLimited, LogitsDatasetSequences, PackedSequences,
                                                 ShardSequences, collate)

if TYPE_CHECKING:  # the config class, for the signature only (the stage module imports this one)
    from posttrain.kinds.distill.stage import DistillConfig


def _trainer_class():
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """Trainer with the sparse-KD loss; everything else (resume, logging, FSDP) is the Trainer's."""

        def __init__(self, *args, distill: dict[str, Any], **kwargs):
            super().__init__(*args, **kwargs)
            self.distill = distill
            self.parts: dict[str, list[Any]] = {"kd_loss": [], "ce_loss": []}  # numbers or device scalars
            self.loss_is_scaled_for_ga = True  # compute_loss divides by the step's token count itself

        def _get_num_items_in_batch(self, batch_samples, device):
            """Trained positions of the whole optimizer step (every micro-batch of a gradient
            accumulation, and every rank), so each token weighs the same wherever it sits."""
            import torch

            count = sum(int(batch["valid"].sum()) for batch in batch_samples)
            count = torch.tensor(count, device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count).sum()
            return count

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # Through the wrapped model's own forward (see install_distill_forward), so DDP's and FSDP's
            # hooks see the whole computation, the output head included.
            out = model(**inputs, distill=self.distill, normalizer=num_items_in_batch)
            loss = out["loss"]
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP and FSDP average gradients over ranks
            for key, value in out["parts"].items():
                self.parts[key].append(value)
            return (loss, None) if return_outputs else loss

        def log(self, logs: dict[str, float], *args, **kwargs) -> None:
            import torch

            for key, values in self.parts.items():
                if values and "loss" in logs:
                    logs[key] = float(torch.stack([torch.as_tensor(v).float().cpu() for v in values]).mean())
                    values.clear()
            super().log(logs, *args, **kwargs)

    return DistillTrainer


def install_distill_forward(model) -> None:
    """Give the student a forward that returns the sparse-KD loss when called with distill targets.

    The loss needs the final hidden states and the output head, never the [T, V] logits. Computing it
    outside the model's forward would use the head's weight where FSDP has not gathered it (on a
    sharded model it is a shard) and miss DDP's and FSDP's backward hooks, so it runs inside: the
    decoder, then the chunked loss over the head, all within one call of the (wrapped) model. Called
    without distill targets (generation, plain evaluation) the model's own forward runs.
    """
    import types

    plain_forward = model.forward

    def forward(self, *args, distill=None, normalizer=None, valid=None, valid_index=None, target_ids=None,
                target_values=None, next_tokens=None, target_tail=None, **inputs):
        if distill is None:
            return plain_forward(*args, **inputs)
        core = self.get_decoder()
        # Packed rows: transformers makes attention block-diagonal from restarting position ids, but
        # only with no attention mask and no KV cache (use_cache=False).
        if "position_ids" in inputs:
            hidden = core(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                          use_cache=False).last_hidden_state
        else:
            hidden = core(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                          use_cache=False).last_hidden_state
        if valid_index.numel() == 0:  # a shape, known on the host: no device sync
            # Every rank must still run the head (FSDP gathers it collectively); zero loss, zero grads.
            return {"loss": self.get_output_embeddings()(hidden[:, :1]).sum() * 0.0, "parts": {}}
        # Picked by index, not by a boolean mask: the result's size is known without asking the device.
        trained = hidden.reshape(-1, hidden.shape[-1]).index_select(0, valid_index)
        loss, parts = fused_distill_loss(
            trained, self.get_output_embeddings(), target_ids, target_values, next_tokens,
            alpha=distill["alpha"], loss=distill["loss"], temperature=distill["temperature"],
            chunk_size=distill["chunk_size"], teacher_tail=target_tail, normalizer=normalizer)
        return {"loss": loss, "parts": parts}

    model.forward = types.MethodType(forward, model)


def run_distill(config: DistillConfig, ctx: StageContext) -> dict[str, Any]:
    from transformers import TrainingArguments

    from posttrain.hf.weights import load_trainable

    student_path = ctx.inputs["model"].path
    tokenizer = load_chat_tokenizer(student_path, None, ctx)
    model = load_trainable(student_path, config.master_weights)
    choose_attention(model, config.attn_implementation)
    install_distill_forward(model)
    if config.teacher_logits or config.teacher_logits_path:
        folder = ctx.inputs["teacher_logits"].path if config.teacher_logits else ctx.resolve(config.teacher_logits_path)
        data = ShardSequences(folder)
        source = f"stage input {config.teacher_logits!r}" if config.teacher_logits else str(folder)
        check_compatible(data.meta, tokenizer, model.config.vocab_size, source)
        if data.meta.get("values") != "logprobs" and config.loss != "renormalized":
            raise UserError("stored values are not log-probs: use loss: renormalized")
    else:
        data = LogitsDatasetSequences(config.logits_dataset, ctx.recipe_dir, tokenizer, config.assistant_only)
        if data.meta["vocab_size"] > model.config.vocab_size:
            raise UserError(f"the student's vocabulary ({model.config.vocab_size}) is smaller than the teacher's "
                            f"({data.meta['vocab_size']}): the tokenizers are not compatible")
    meta = data.meta
    temperature = float(meta.get("temperature") or 1.0)
    data = LengthLimited(data, config.max_length, config.overlong)
    if not len(data):
        raise UserError(f"no sequences left: all are longer than max_length ({config.max_length}) and overlong is drop")
    sequences = len(data)
    data_counts = {**data.counts, "double_bos_rows": meta.get("double_bos_rows", 0)}
    if config.packing:
        data = PackedSequences(data, config.max_length)
    train, evaluation = data, None
    if config.test_size:
        import torch

        size = int(config.test_size if config.test_size >= 1 else round(config.test_size * len(data)))
        generator = torch.Generator().manual_seed(ctx.seed)
        train, evaluation = torch.utils.data.random_split(data, [len(data) - size, size], generator=generator)
    checkpoints = ctx.work_dir / "checkpoints"
    training = speed_settings(device_defaults(dict(config.training), evaluation is not None), torch_cuda_available())
    if torch_cuda_available():
        # Shards are decoded (bit unpacking, rANS for compact) in worker processes into pinned memory,
        # while the GPU trains on the previous batch, instead of on the main process between steps.
        training.setdefault("dataloader_num_workers", 2)
        training.setdefault("dataloader_persistent_workers", True)
        training.setdefault("dataloader_prefetch_factor", 4)
    args = TrainingArguments(output_dir=str(checkpoints), seed=ctx.seed, save_strategy="steps",
                             save_steps=config.save_steps, remove_unused_columns=False,
                             activation_checkpointing=config.gradient_checkpointing, **training)
    trainer = sharded(_trainer_class())(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation,
        data_collator=partial(collate, pad_id=tokenizer.pad_token_id or 0, assistant_only=config.assistant_only),
        distill={"alpha": config.alpha, "loss": config.loss, "temperature": temperature,
                 "chunk_size": config.chunk_size},
        callbacks=callbacks(ctx) + tracker_callbacks(ctx),
    )
    _, run_metrics = train_model(trainer, checkpoints)
    save_model_entry(trainer, tokenizer, ctx, lora=False, checkpoints=checkpoints)
    history = trainer.state.log_history
    return {
        **{key: logged_series(history, key) for key in ("loss", "kd_loss", "ce_loss", "eval_loss")},
        **run_metrics,
        "sequences": sequences,
        **data_counts,
        "packed_rows": len(data) if config.packing else None,
        "temperature": temperature,
        "teacher": meta.get("teacher"),
        "loss_type": config.loss,
        "alpha": config.alpha,
    }
