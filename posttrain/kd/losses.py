"""Distillation losses against stored sparse (top-k) teacher targets.

Per position, with stored set S, teacher log-probs log p_i (full-vocabulary, i in S) and student
q = softmax(z / T):

  forward_kl (default)  T^2 * [ sum_S p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail) ]
  renormalized          T^2 * KL(p restricted to S, renormalised || q restricted to S, renormalised);
                        the only valid choice for raw top-k logits, whose tail mass is unknown
  reverse_kl            T^2 * KL(q || p) over the buckets S and tail (an approximation)
  jsd                   T^2 * JS(p, q) over the buckets S and tail (an approximation)

The teacher's tail is the stored one when the capture wrote it (exact, before quantisation), else
log(-expm1(logsumexp(log p_S))). The student's tail is a logsumexp over the ids NOT stored, never
1 - sum q_S: for a confident student that difference underflows in fp32 (forward_kl 3.26 instead of
0.98, and no gradient reaching the tail logits). When S covers the whole vocabulary there is no tail
bucket at all, and forward_kl is exactly the full KL divergence.

A position's stored ids may repeat (sampled targets draw with replacement): a repeat is dropped
(weight 0), so every loss sees each id once, with the mass the capture gave its first occurrence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSSES = ("forward_kl", "renormalized", "reverse_kl", "jsd")
# log(1 - x) for x within ~1e-30 of 1 stays finite: the tail of a stored set that covers (almost)
# all the mass contributes ~0 instead of 0 * -inf = NaN.
_NEAR_ZERO = -1e-30
_LOG_HALF = -0.6931471805599453


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both ends (Maechler 2012)."""
    x = x.clamp(max=_NEAR_ZERO)
    return torch.where(x > _LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def repeated_ids(ids: torch.Tensor) -> torch.Tensor:
    """[n, k] bool: True where an id already appeared earlier in the same row."""
    same = ids.unsqueeze(-1) == ids.unsqueeze(-2)  # [n, k, k]
    earlier = torch.ones(ids.shape[-1], ids.shape[-1], dtype=torch.bool, device=ids.device).tril(-1)
    return (same & earlier).any(-1)


_FLOOR = -1e4  # exp() of it is 0 in fp32; keeps every log finite so no gradient is ever NaN


def _bucket_kl(log_a, log_a_tail, log_b, log_b_tail, keep, has_tail) -> torch.Tensor:
    """KL(a || b) over the kept buckets of S (last dim) and, where there is one, the tail."""
    body = (keep * log_a.exp() * (log_a - log_b)).sum(-1)
    return body + has_tail * log_a_tail.exp() * (log_a_tail - log_b_tail)


def _masked_logsumexp(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(torch.where(keep, x, torch.full_like(x, float("-inf"))), dim=-1)


def student_tail(log_q_all: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q_tail, has_tail): logsumexp of the student's log-probs over the ids not stored.

    Where every id is stored there is no tail: has_tail is 0 and log q_tail a finite placeholder."""
    stored = torch.zeros_like(log_q_all, dtype=torch.bool).scatter(-1, ids, True)
    has_tail = ~stored.all(-1)
    unstored = torch.where(stored, torch.full_like(log_q_all, float("-inf")), log_q_all)
    unstored = torch.where(has_tail.unsqueeze(-1), unstored, torch.zeros_like(unstored))  # no -inf rows
    return torch.logsumexp(unstored, dim=-1).clamp(min=_FLOOR), has_tail.float()


def sparse_kd(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logp: torch.Tensor,
              loss: str = "forward_kl", temperature: float = 1.0,
              teacher_tail: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position loss [n] for student logits [n, V], stored ids [n, k] and teacher values [n, k].

    `teacher_tail` [n] is the teacher's stored log tail mass, when the capture recorded it.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown distillation loss {loss!r}; one of {', '.join(LOSSES)}")
    log_q_all = F.log_softmax(student_logits.float() / temperature, dim=-1)
    keep_mask = ~repeated_ids(ids)
    keep = keep_mask.float()
    log_p = teacher_logp.float().clamp(min=_FLOOR)
    log_q = log_q_all.gather(-1, ids).clamp(min=_FLOOR)
    if loss == "renormalized":
        log_p_hat = log_p - _masked_logsumexp(log_p, keep_mask).unsqueeze(-1)
        log_q_hat = log_q - _masked_logsumexp(log_q, keep_mask).unsqueeze(-1)
        return (keep * log_p_hat.exp() * (log_p_hat - log_q_hat)).sum(-1) * temperature ** 2
    log_q_tail, has_tail = student_tail(log_q_all, ids)
    if teacher_tail is None:
        log_p_tail = log1mexp(_masked_logsumexp(log_p, keep_mask))
    else:
        log_p_tail = teacher_tail.float()
        # Make the stored body and tail one distribution (quantised codes can sum above 1 - tail).
        body = _masked_logsumexp(log_p, keep_mask).unsqueeze(-1)
        log_p = log_p - body + log1mexp(log_p_tail.clamp(max=_NEAR_ZERO)).unsqueeze(-1)
    log_p_tail = log_p_tail.clamp(min=_FLOOR)
    if loss == "forward_kl":
        per_position = _bucket_kl(log_p, log_p_tail, log_q, log_q_tail, keep, has_tail)
    elif loss == "reverse_kl":
        per_position = _bucket_kl(log_q, log_q_tail, log_p, log_p_tail, keep, has_tail)
    else:  # jsd
        log_m = torch.logaddexp(log_p, log_q) + _LOG_HALF
        log_m_tail = torch.logaddexp(log_p_tail, log_q_tail) + _LOG_HALF
        per_position = 0.5 * (_bucket_kl(log_p, log_p_tail, log_m, log_m_tail, keep, has_tail)
                              + _bucket_kl(log_q, log_q_tail, log_m, log_m_tail, keep, has_tail))
    return per_position * temperature ** 2


def _chunk_sums(hidden, head, ids, teacher_logp, teacher_tail, labels, loss, temperature, with_ce):
    logits = head(hidden)
    kd = sparse_kd(logits, ids, teacher_logp, loss, temperature, teacher_tail).sum()
    ce = F.cross_entropy(logits.float(), labels, reduction="sum") if with_ce else kd.new_zeros(())
    return kd, ce


def distill_loss(hidden: torch.Tensor, head: torch.nn.Module, ids: torch.Tensor, teacher_logp: torch.Tensor,
                 labels: torch.Tensor, alpha: float = 1.0, loss: str = "forward_kl", temperature: float = 1.0,
                 chunk_size: int = 1024, teacher_tail: torch.Tensor | None = None,
                 normalizer: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha * KD + (1 - alpha) * CE, each summed over the given positions and divided by `normalizer`.

    `normalizer` is the number of trained positions of the whole optimizer step (every micro-batch of
    a gradient accumulation, every rank), so each token weighs the same whatever micro-batch it is in;
    without it, this batch's positions. `hidden` [N, H] are the student's final hidden states at trained
    positions only; logits are made `chunk_size` positions at a time and recomputed in backward, so no
    [N, V] tensor is ever held. At alpha = 1 the cross-entropy is not computed at all.
    """
    n = hidden.shape[0]
    with_ce = alpha < 1
    kd_total = hidden.new_zeros((), dtype=torch.float32)
    ce_total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        part = slice(start, start + chunk_size)
        tail = teacher_tail[part] if teacher_tail is not None else None
        args = (hidden[part], head, ids[part], teacher_logp[part], tail, labels[part], loss, temperature, with_ce)
        if torch.is_grad_enabled() and hidden.requires_grad:
            kd, ce = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            kd, ce = _chunk_sums(*args)
        kd_total = kd_total + kd
        ce_total = ce_total + ce
    denominator = normalizer if normalizer is not None else max(n, 1)
    total = (alpha * kd_total + (1 - alpha) * ce_total) / denominator
    parts = {"kd_loss": float(kd_total.detach()) / max(n, 1)}
    if with_ce:
        parts["ce_loss"] = float(ce_total.detach()) / max(n, 1)
    return total, parts
