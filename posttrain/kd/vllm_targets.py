"""vLLM `prompt_logprobs` -> the sparse targets our shards store, for a vLLM capture backend.

vLLM returns, for a prompt of n tokens, a list of n entries: None for the first token, then for each
later token t a mapping token id -> Logprob(logprob, rank, ...) of the teacher's distribution over token
t given the tokens before it: the top-k ids, plus the prompt's actual token t as a (k+1)-th entry when it
is not among them. Our shards pair position t with the distribution of token t + 1, so shard position t
takes vLLM's entry t + 1, keeps the k best entries (the extra actual token is dropped unless it ranks
in), and the last position (no next token in the prompt, never trained on) gets an empty target.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def _logprob(entry: Any) -> float:
    return float(entry.logprob if hasattr(entry, "logprob") else entry)


def from_prompt_logprobs(prompt_logprobs: Sequence[dict[int, Any] | None], k: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids [n, k] int64, log-probs [n, k] float32 (best first) and log tail [n] float32 for a prompt of n
    tokens, aligned with our shards (position t: the distribution of token t + 1)."""
    n = len(prompt_logprobs)
    ids = np.zeros((n, k), dtype=np.int64)
    values = np.full((n, k), -np.inf, dtype=np.float32)
    tails = np.zeros(n, dtype=np.float32)  # the empty last target: all mass in the tail
    for t in range(n - 1):
        entry = prompt_logprobs[t + 1]
        if not entry:
            raise ValueError(f"prompt_logprobs[{t + 1}] is empty: ask vLLM for prompt_logprobs={k}")
        best = sorted(entry.items(), key=lambda item: -_logprob(item[1]))[:k]
        if len(best) < k:
            raise ValueError(f"prompt_logprobs[{t + 1}] has {len(best)} entries, fewer than k = {k}")
        ids[t] = [token for token, _ in best]
        logps = np.array([_logprob(lp) for _, lp in best], dtype=np.float64)
        values[t] = logps
        top = float(np.logaddexp.reduce(logps))
        tails[t] = math.log(-math.expm1(min(top, -1e-30)))  # log(1 - sum p), exact for small tails
    return ids, values, tails
