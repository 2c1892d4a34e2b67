"""The eval stage's body: lm-eval's Python API per model, and the built-in metrics."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any


from posttrain.core.context import StageContext
from posttrain.data.prepare import open_prepared
from posttrain.data.tokens import IGNORE
from posttrain.core.errors import UserError
from posttrain.evaluation.tasks import copy_task_dirs

if TYPE_CHECKING:  # the config class, for the signature only (the stage module imports this one)
    from posttrain.kinds.eval.stage import EvalConfig


def prepare_task_dirs(task_dirs: list[str], ctx: StageContext) -> Path | None:
    """The recipe's task folders, copied to the work folder with their data files made absolute."""
    if not task_dirs:
        return None
    return copy_task_dirs([ctx.resolve(folder) for folder in task_dirs], ctx.work_dir / "tasks")


def run_eval(config: EvalConfig, ctx: StageContext) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {}
    include = prepare_task_dirs(config.task_dirs, ctx)
    reused = []
    for i, name in enumerate(config.models):
        entry = ctx.inputs[f"models.{i}"]
        cached = _cache_path(config, ctx, i, include)
        if cached is not None and cached.is_file():
            results[name] = json.loads(cached.read_text())
            reused.append(name)
            ctx.log.info("eval %s: the same model was evaluated the same way before: %s", name, cached)
            continue
        model_results: dict[str, Any] = {}
        chat = config.apply_chat_template if config.apply_chat_template != "auto" else entry.kind != "model"
        if config.tasks:
            model_results.update(_lm_eval(entry.path, config, include, bool(chat), ctx.seed))
        if config.perplexity or config.exact_match or config.preference:
            model_results.update(_builtin(entry.path, config, ctx, i))
        results[name] = model_results
        ctx.log.info("eval %s: %s", name, json.dumps(model_results))
        if cached is not None and ctx.is_main:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp{ctx.rank}")
            tmp.write_text(json.dumps(model_results))
            tmp.replace(cached)
    if ctx.is_main:
        (ctx.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return {"results": results, "models": {n: ctx.inputs[f"models.{i}"].key for i, n in enumerate(config.models)},
            "reused_results": reused}


def _cache_path(config: EvalConfig, ctx: StageContext, index: int, include: Path | None) -> Path | None:
    """Where one model's results are kept, named by everything that decides them: the model entry, the
    data prepared for it, the teacher for KL, every setting but the model list, the task files, the
    seed and the eval code. A sweep that grows by one candidate evaluates only the new one."""
    import hashlib

    from posttrain.registry.code_fingerprint import code_fingerprint

    if ctx.results_cache is None:
        return None
    settings = config.model_dump(mode="json", exclude={"models", "description"})
    inputs = {path: entry.key for path, entry in ctx.inputs.items()
              if path == f"models.{index}" or path == "kl_to" or path.endswith(f"_data.{index}")}
    tasks = sorted((str(p.relative_to(include)), hashlib.sha256(p.read_bytes()).hexdigest())
                   for p in include.rglob("*") if p.is_file()) if include else []
    material = {"settings": settings, "inputs": inputs, "tasks": tasks, "seed": ctx.seed,
                "code": code_fingerprint(__name__)}  # this body and what it runs
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return ctx.results_cache / "eval" / f"{digest}.json"


def _lm_eval(path: Path, config, include: Path | None, chat: bool, seed: int) -> dict[str, Any]:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if config.backend == "vllm":
        lm = _vllm_model(path, config, seed)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        lm = HFLM(pretrained=str(path), device=device, batch_size=config.batch_size, dtype="auto")
    manager = TaskManager(include_path=str(include) if include else None)
    try:
        output = simple_evaluate(model=lm, tasks=list(config.tasks), num_fewshot=config.num_fewshot,
                                 limit=config.limit, task_manager=manager, apply_chat_template=chat,
                                 log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                 torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=1000)
    except KeyError as exc:
        raise UserError(f"lm-eval does not know task {exc}; check `tasks` and `task_dirs`") from exc
    found: dict[str, Any] = {}
    for task, metrics in (output or {}).get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            label = f"{task}/{metric}" if filter_name in ("none", "last-number") else f"{task}/{metric}/{filter_name}"
            found[label] = {"value": float(value),
                            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return found


def _vllm_model(path: Path, config, seed: int):
    """lm-eval's vllm model for the folder: generation and log-likelihood requests batched by vLLM."""
    try:
        from lm_eval.models.vllm_causallms import VLLM
    except ImportError:
        raise UserError("eval backend: vllm needs vLLM: pip install 'posttrain[vllm]' (on a GPU machine)") from None
    settings = config.vllm
    options = {"max_model_len": settings.max_model_len} if settings.max_model_len else {}
    return VLLM(pretrained=str(path), dtype="auto", batch_size=config.batch_size, seed=seed,
                tensor_parallel_size=settings.tensor_parallel_size,
                gpu_memory_utilization=settings.gpu_memory_utilization, **options, **settings.options)


def _builtin(path: Path, config, ctx: StageContext, index: int) -> dict[str, Any]:
    """Held-out loss/perplexity (and KL to a teacher), preference accuracy and exact match of model
    `index`, on its prepared data (memory-mapped; rows are read one at a time)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.training.splits import check_tokenization

    device = "cuda" if torch.cuda.is_available() else "cpu"  # one GPU is plenty for these metrics
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = None
    if config.kl_to:
        teacher = AutoModelForCausalLM.from_pretrained(ctx.inputs["kl_to"].path, dtype="auto").eval().to(device)

    def rows(what: str):
        """Every prepared row (a held-out split in the eval data's config is evaluated too)."""
        prepared = ctx.inputs[f"{what}_data.{index}"]
        check_tokenization(prepared.manifest, tokenizer, ctx.name)
        for split in ("train", "eval"):
            yield from open_prepared(prepared.path, split, ctx.work_dir / f"{what}-{index}") or ()

    found: dict[str, Any] = {}
    if config.perplexity:
        total, count, per_row, kl_total = 0.0, 0, [], 0.0
        for row in rows("perplexity"):
            ids = torch.tensor([row["input_ids"]], device=device)
            with torch.no_grad():
                logits = model(ids).logits[0, :-1].float()
                if teacher is not None:
                    teacher_logp = torch.log_softmax(teacher(ids).logits[0, :-1].float(), -1)
            targets = torch.tensor(row["labels"][1:], device=device)
            keep = targets != IGNORE
            losses = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="none")
            total += float(losses.sum())
            count += int(keep.sum())
            per_row.append(float(losses.mean()))
            if teacher is not None:
                student_logp = torch.log_softmax(logits, -1)
                kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
                kl_total += float(kl[keep].sum())
        loss = total / max(count, 1)
        stderr = (torch.tensor(per_row).std().item() / math.sqrt(len(per_row))) if len(per_row) > 1 else None
        found["heldout/loss"] = {"value": loss, "stderr": stderr}
        found["heldout/perplexity"] = {"value": math.exp(loss), "stderr": None}
        if teacher is not None:
            found["heldout/kl_to_teacher"] = {"value": kl_total / max(count, 1), "stderr": None}
    if config.preference:
        margins = [_logp(model, p["prompt_ids"], p["chosen_ids"]) - _logp(model, p["prompt_ids"], p["rejected_ids"])
                   for p in rows("preference")]
        wins = [float(m > 0) for m in margins]
        accuracy = sum(wins) / len(wins)
        found["preference/accuracy"] = {"value": accuracy,
                                        "stderr": math.sqrt(accuracy * (1 - accuracy) / len(wins)) if len(wins) > 1 else None}
        found["preference/margin"] = {"value": sum(margins) / len(margins), "stderr": None}
    if config.exact_match:
        hits = []
        for row in rows("exact_match"):
            prompt = row["prompt_ids"]
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt], device=device),
                                     attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
                                     max_new_tokens=config.exact_match.max_new_tokens, do_sample=False)
            answer = tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip()
            hits.append(float(answer == row["answer"]))
        mean = sum(hits) / len(hits)
        found["generation/exact_match"] = {"value": mean,
                                           "stderr": math.sqrt(mean * (1 - mean) / len(hits)) if len(hits) > 1 else None}
    return found


def _logp(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """log p(completion | prompt) under `model`, summed over the completion's tokens."""
    import torch

    ids = torch.tensor([prompt_ids + completion_ids], device=model.device)
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    token_logps = logps.gather(1, ids[0, 1:, None])[:, 0]
    return float(token_logps[len(prompt_ids) - 1:].sum())
