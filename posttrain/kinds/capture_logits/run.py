"""The body of the capture stage: batched teacher forward -> sparse targets -> shards."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from posttrain.kd.compact import parameters as compact_parameters
from posttrain.kd.shards import read_shard, shard_meta, write_index, write_shard
from posttrain.hf.tokenizer_check import special_token_ids, tokenizer_hash
from posttrain.core.errors import UserError
from posttrain.core.context import StageContext
from posttrain.training.trainer_common import load_chat_tokenizer
from posttrain.data.tokens import IGNORE
from posttrain.training.splits import prepared_datasets

if TYPE_CHECKING:  # the config class, for the signature only (the stage module imports this one)
    from posttrain.kinds.capture_logits.stage import CaptureConfig


POSITION_CHUNK = 1024  # positions whose logits exist at once (1024 x 128256 fp32 = 0.5 GB)


def sparse_targets(logits, k: int, mode: str, temperature: float, generator=None):
    """[n, V] teacher logits -> ids [n, k], full-vocabulary log-probs [n, k] and the log of the mass
    outside the stored ids [n] (exact, before any quantisation; -inf when nothing is left), float32."""
    import torch

    from posttrain.kd.losses import student_tail

    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if mode == "topk":
        values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        tail, has_tail = student_tail(logp, ids)
        return ids, values, torch.where(has_tail.bool(), tail, torch.full_like(tail, float("-inf")))
    # Sampled targets: k draws from the teacher; a token drawn c times gets log(c / k) on its first
    # occurrence and repeats are dropped by the losses, so the stored (empirical) distribution sums to 1,
    # has no tail, and the forward-KL gradient is an unbiased estimate of the full one.
    draws = torch.multinomial(logp.exp(), k, replacement=True, generator=generator)
    ids, _ = draws.sort(dim=-1)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    counts = (ids.unsqueeze(-1) == ids.unsqueeze(-2)).sum(-1).float()
    values = torch.where(first, torch.log(counts / k), torch.full_like(counts, -15.0))
    return ids, values, torch.full(ids.shape[:1], float("-inf"), device=ids.device)


def tail_error(stored: np.ndarray, exact_tail: np.ndarray, mode: str) -> tuple[float, int, int]:
    """What quantisation does to the tail mass: (sum |(1 - sum p_stored) - exact tail|, positions whose
    stored probabilities sum above 1, positions). The exact tail is stored beside the values, so the
    losses never use the quantised one; this says how wrong it would have been."""
    if mode != "topk":
        return 0.0, 0, len(stored)
    total = np.exp(stored.astype(np.float64)).sum(-1)
    error = np.abs((1 - total) - np.exp(exact_tail.astype(np.float64)))
    return float(error.sum()), int((total > 1).sum()), len(stored)


def summarise_tail_errors(parts: list[tuple[float, int, int]]) -> dict[str, Any]:
    positions = sum(p[2] for p in parts)
    if not positions:
        return {}
    return {"mean_abs_tail_mass_error_of_codes": sum(p[0] for p in parts) / positions,
            "share_of_positions_with_codes_summing_above_1": sum(p[1] for p in parts) / positions,
            "tail_mass_stored": "exact (float32 per position)"}


def teacher_name(entry) -> str:
    """A starting model by its hub id or folder; a trained one by its ref (recipe/stage)."""
    manifest = entry.manifest
    if entry.kind == "model":
        return str(manifest.get("config", {}).get("model") or entry.key)
    return str(manifest.get("ref") or entry.key)


def stored_bytes_per_position(vocab: int, k: int, encoding: str) -> int:
    """Bytes one position takes in a shard: packed ids and values, the tail, its input id and mask. For
    the compact encoding an estimate (its size depends on the teacher): ~1.45 B per entry at V = 128256."""
    from posttrain.kd.packing import bytes_per_token

    if encoding == "compact":
        return -(-3 * k // 2) + 5
    return bytes_per_token(vocab, k, encoding) + 4 + 4 + 1


def shard_groups(lengths: list[int], max_sequences: int, max_bytes: int, per_position: int) -> list[tuple[int, int]]:
    """Consecutive [first, last) sequence ranges: at most `max_sequences` and about `max_bytes` each (a
    sequence longer than the budget gets a shard of its own). Deterministic, so a resumed capture finds
    the same shards."""
    groups, first, size = [], 0, 0
    for index, length in enumerate(lengths):
        cost = length * per_position
        if index > first and (index - first >= max_sequences or size + cost > max_bytes):
            groups.append((first, index))
            first, size = index, 0
        size += cost
    if lengths:
        groups.append((first, len(lengths)))
    return groups


def _sequences(dataset, first: int, last: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and assistant masks of prepared rows [first, last): one shard's worth, read from the
    memory-mapped Arrow files when that shard is made."""
    part = dataset[first:last]
    return part["input_ids"], [[int(label != IGNORE) for label in labels] for labels in part["labels"]]


def _teacher_targets(model, batch: list[list[int]], pad_id: int, k: int, config, generator):
    """The teacher's sparse targets (ids, log-probs, log tail) for every position of a padded batch.

    Hidden states for the whole batch, logits only POSITION_CHUNK positions at a time: the
    [batch, length, vocab] logits and their fp32 log-softmax never exist at once."""
    import torch

    device = next(model.parameters()).device
    longest = max(len(s) for s in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, seq in enumerate(batch):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        attention[row, :len(seq)] = 1
    valid = attention.bool().to(device)
    head = model.get_output_embeddings()
    ids_parts, value_parts, tail_parts = [], [], []
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=input_ids.to(device),
                                     attention_mask=attention.to(device)).last_hidden_state[valid]
        for start in range(0, len(hidden), POSITION_CHUNK):
            ids, values, tails = sparse_targets(head(hidden[start:start + POSITION_CHUNK]), k, config.mode,
                                                config.temperature, generator)
            ids_parts.append(ids.to(torch.int32).cpu().numpy())  # half the memory of a shard's worth
            value_parts.append(values.cpu().numpy())
            tail_parts.append(tails.cpu().numpy())
    return np.concatenate(ids_parts), np.concatenate(value_parts), np.concatenate(tail_parts)


class VllmTeacher:
    """The teacher served by vLLM (tensor/pipeline parallel over the node's GPUs), asked for the top-k
    log-probs of every prompt position; converted to the shards' alignment by `from_prompt_logprobs`."""

    def __init__(self, path, config, longest: int):
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise UserError("capture backend: vllm needs vLLM: pip install 'posttrain[vllm]' (on a GPU machine)") from None
        settings = config.vllm
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=config.k, temperature=1.0)
        self.llm = LLM(model=str(path), tensor_parallel_size=settings.tensor_parallel_size,
                       pipeline_parallel_size=settings.pipeline_parallel_size,
                       gpu_memory_utilization=settings.gpu_memory_utilization, dtype=settings.dtype,
                       max_model_len=settings.max_model_len or longest + 1, max_logprobs=config.k,
                       skip_tokenizer_init=True, **settings.options)

    def targets(self, batch: list[list[int]], k: int):
        """ids, log-probs and log tails of every position of the batch's sequences, concatenated."""
        from posttrain.kd.vllm_targets import from_prompt_logprobs

        outputs = self.llm.generate([{"prompt_token_ids": list(seq)} for seq in batch], self.params, use_tqdm=False)
        parts = [from_prompt_logprobs(out.prompt_logprobs, k) for out in outputs]
        return tuple(np.concatenate([part[i] for part in parts]) for i in range(3))


Targets = Callable[[list, int], tuple]  # (sequences, k) -> (ids, values, tails) of every position


def _open_teacher(config: CaptureConfig, folder: Path, pad_id: int, longest: int, seed: int) -> tuple[int, Targets]:
    """The teacher's vocabulary size and what gives a batch's targets: vLLM's prompt logprobs, or the
    transformers model's logits on this process's device."""
    import torch

    if config.backend == "vllm":
        from transformers import AutoConfig

        teacher = VllmTeacher(folder, config, longest)
        return AutoConfig.from_pretrained(folder).vocab_size, teacher.targets
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").to(device).eval()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return model.config.vocab_size, lambda batch, k: _teacher_targets(model, batch, pad_id, k, config, generator)


def run_capture(config: CaptureConfig, ctx: StageContext) -> dict[str, Any]:
    from tqdm.auto import tqdm

    teacher_entry = ctx.inputs["teacher"]
    tokenizer = load_chat_tokenizer(teacher_entry.path, config.chat_template, ctx)
    dataset, _, stats = prepared_datasets(ctx, tokenizer)
    lengths = np.asarray(dataset.data.column("length"), dtype=np.int64)
    vocab, targets = _open_teacher(config, teacher_entry.path, tokenizer.pad_token_id or 0, int(lengths.max()), ctx.seed)
    if config.mode == "topk" and config.k > vocab:
        raise UserError(f"k = {config.k} is larger than the teacher's vocabulary ({vocab})")
    data_hash = ctx.inputs["data"].key  # the prepared data's content address: same rows, same tokens
    meta = shard_meta(
        teacher=teacher_name(teacher_entry),
        teacher_key=teacher_entry.key, tokenizer_hash=tokenizer_hash(tokenizer), vocab_size=vocab,
        k=min(config.k, vocab), encoding=config.encoding, mode=config.mode,
        samples=config.k if config.mode == "sampled" else None, temperature=config.temperature,
        chat_template_sha256=hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
        data_fingerprint=data_hash, values="logprobs", special_tokens=special_token_ids(tokenizer),
        **({"compact": compact_parameters(), "mass": config.mass} if config.encoding == "compact" else {}),
    )
    shard_dir = ctx.work_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    total_tokens = int(lengths.sum())
    index, error_sum, error_count, started, resumed, entries = [], 0.0, 0, time.time(), 0, 0
    tail_errors: list[tuple[float, int, int]] = []
    resumed_tokens = 0
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="capturing teacher logits")
    per_position = stored_bytes_per_position(vocab, meta["k"], config.encoding)
    for shard_no, (first, last) in enumerate(shard_groups(lengths.tolist(), config.shard_sequences,
                                                          config.shard_bytes, per_position)):
        path = shard_dir / f"shard-{shard_no:05d}.safetensors"
        group_tokens = int(lengths[first:last].sum())
        if path.exists():
            try:
                read_shard(path, {"data_fingerprint": data_hash, "k": meta["k"], "encoding": config.encoding})
                index.append({"file": path.name, "sequences": last - first, "tokens": group_tokens})
                resumed += 1
                resumed_tokens += group_tokens
                bar.update(group_tokens)
                continue  # finished before an interruption: shard by shard resume
            except UserError:
                path.unlink()
        parts = []
        sequences, masks = _sequences(dataset, first, last)
        for start in range(0, last - first, config.batch_size):
            batch = sequences[start:start + config.batch_size]
            ids, values, tails = targets(batch, meta["k"])
            parts.append((ids.astype(np.int32, copy=False), values, tails))
            bar.update(sum(len(seq) for seq in batch))
            ctx.progress({"tokens": bar.n, "step": bar.n, "total": total_tokens})
        ids_np, values_np, tails_np = (np.concatenate([part[i] for part in parts]) for i in range(3))
        stored, stored_tail = write_shard(path, sequences, masks, ids_np, values_np, meta, tails_np)
        finite = np.isfinite(stored) & np.isfinite(values_np)
        error_sum += float(np.abs(stored[finite] - values_np[finite]).sum())
        error_count += int(finite.sum())
        entries += int(np.isfinite(stored).sum())
        tail_errors.append(tail_error(stored, tails_np if stored_tail is None else stored_tail, config.mode))
        index.append({"file": path.name, "sequences": last - first, "tokens": group_tokens})
    bar.close()
    seconds = time.time() - started
    if ctx.is_main:
        for item in index:
            os.replace(shard_dir / item["file"], ctx.out_dir / item["file"])
        write_index(ctx.out_dir, meta, index)
    stored = sum((ctx.out_dir / item["file"]).stat().st_size for item in index) if ctx.is_main else 0
    stats.update(
        sequences=len(lengths), tokens=total_tokens, shards=len(index), shards_resumed=resumed, seconds=round(seconds, 3),
        tokens_per_second=round(total_tokens / max(seconds, 1e-9), 1),
        bytes_per_token=round(stored / total_tokens, 2),
        mean_abs_value_error=(error_sum / error_count) if error_count else None,
        **summarise_tail_errors(tail_errors),
        k=meta["k"], encoding=config.encoding, mode=config.mode,
        **({"mass": config.mass, "mean_entries_per_position": round(entries / max(total_tokens - resumed_tokens, 1), 2)}
           if config.mass is not None else {}),
    )
    return stats
