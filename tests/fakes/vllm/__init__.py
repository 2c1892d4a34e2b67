"""A stand-in for vLLM's offline API (`LLM.generate` with `prompt_logprobs`), for CPU tests only.

It answers from the transformers model in the folder it is given, in vLLM's shapes. Generation is
greedy (temperature 0, as lm-eval asks), cut before the first stop string like vLLM's. For a prompt of n
tokens, `prompt_logprobs` is a list of n entries, None first, then for token t a dict id -> Logprob of
the top-k ids of the distribution of token t given the tokens before it, plus the prompt's actual token
t (listed first, as vLLM may) when it is not among them. It exists so the capture stage's vLLM backend and
the eval stage's (lm-eval's own `vllm` model, unchanged, on top of this) run end to end here; the real
comparison of the backends needs a GPU (bench/gpu_smoke.py). `vllm-0.11.0.dist-info` beside this
package gives lm-eval the version it checks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

created: list[dict[str, Any]] = []  # the arguments of every LLM(...), for tests to inspect


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class SamplingParams:
    def __init__(self, max_tokens: int = 16, prompt_logprobs: int | None = None, temperature: float = 1.0,
                 stop: list[str] | str | None = None, detokenize: bool = True, **other: Any):
        self.max_tokens, self.prompt_logprobs, self.temperature = max_tokens, prompt_logprobs, temperature
        self.stop = [stop] if isinstance(stop, str) else list(stop or [])
        self.detokenize, self.other = detokenize, other


def TokensPrompt(prompt_token_ids: list[int]) -> dict[str, Any]:  # noqa: N802 - vLLM's TypedDict
    return {"prompt_token_ids": list(prompt_token_ids)}


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput] | None = None


@dataclass
class _ModelConfig:
    max_model_len: int


@dataclass
class _Engine:
    model_config: _ModelConfig


class LLM:
    def __init__(self, model: str, **kwargs: Any):
        from transformers import AutoModelForCausalLM

        created.append({"model": model, **kwargs})
        self.max_logprobs = kwargs.get("max_logprobs", 20)
        from transformers import AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model, dtype="float32").eval()
        self.tokenizer = AutoTokenizer.from_pretrained(kwargs.get("tokenizer") or model)
        length = kwargs.get("max_model_len") or getattr(self.model.config, "max_position_embeddings", 2048)
        self.llm_engine = _Engine(_ModelConfig(length))

    def generate(self, prompts: list[dict[str, Any]], params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request: Any = None, sampling_params: Any = None):
        params = sampling_params if sampling_params is not None else params
        every = params if isinstance(params, list) else [params] * len(prompts)
        return [self._prompt_logprobs(prompt, p) if p.prompt_logprobs is not None else self._greedy(prompt, p)
                for prompt, p in zip(prompts, every)]

    def _greedy(self, prompt: dict[str, Any], params: SamplingParams) -> RequestOutput:
        import torch

        ids = list(prompt["prompt_token_ids"])
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=params.max_tokens, do_sample=False)
        new = [int(t) for t in out[0, len(ids):]]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        cut = min((text.find(s) for s in params.stop if s and s in text), default=-1)
        return RequestOutput(ids, None, [CompletionOutput(text[:cut] if cut >= 0 else text, new)])

    def _prompt_logprobs(self, prompt: dict[str, Any], params: SamplingParams) -> RequestOutput:
        import torch

        k = params.prompt_logprobs
        if k > self.max_logprobs:
            raise ValueError(f"Requested prompt logprobs of {k}, which is greater than max allowed: {self.max_logprobs}")
        ids = list(prompt["prompt_token_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].double(), -1)
        entries: list[dict[int, Logprob] | None] = [None]
        for t in range(1, len(ids)):
            dist = logp[t - 1]
            values, top = torch.topk(dist, k)
            ranks = {int(i): r + 1 for r, i in enumerate(top)}
            entry: dict[int, Logprob] = {}
            if ids[t] not in ranks:
                rank = int((dist > dist[ids[t]]).sum()) + 1
                entry[ids[t]] = Logprob(float(dist[ids[t]]), rank)
            for value, token in zip(values, top):
                entry[int(token)] = Logprob(float(value), ranks[int(token)])
            entries.append(entry)
        return RequestOutput(ids, entries, [CompletionOutput("", [])])
