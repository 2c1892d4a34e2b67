"""A stand-in for vLLM's offline API (`LLM.generate` with `prompt_logprobs`), for CPU tests only.

It answers from the transformers model in the folder it is given, in vLLM's shapes: for a prompt of n
tokens, `prompt_logprobs` is a list of n entries, None first, then for token t a dict id -> Logprob of
the top-k ids of the distribution of token t given the tokens before it, plus the prompt's actual token
t (listed first, as vLLM may) when it is not among them. It exists so the capture stage's vLLM backend
runs end to end here; the real comparison of the two backends needs a GPU (bench/gpu_smoke.py).
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


@dataclass
class SamplingParams:
    max_tokens: int = 16
    prompt_logprobs: int | None = None
    temperature: float = 1.0


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None]


class LLM:
    def __init__(self, model: str, **kwargs: Any):
        from transformers import AutoModelForCausalLM

        created.append({"model": model, **kwargs})
        self.max_logprobs = kwargs.get("max_logprobs", 20)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype="float32").eval()

    def generate(self, prompts: list[dict[str, Any]], params: SamplingParams, use_tqdm: bool = True):
        import torch

        k = params.prompt_logprobs
        if k is None or k > self.max_logprobs:
            raise ValueError(f"Requested prompt logprobs of {k}, which is greater than max allowed: {self.max_logprobs}")
        outputs = []
        for prompt in prompts:
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
            outputs.append(RequestOutput(ids, entries))
        return outputs
