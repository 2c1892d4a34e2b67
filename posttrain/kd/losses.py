"""Distillation losses against stored sparse (top-k) teacher targets.

Per position, with stored set S, teacher log-probs log p_i (full-vocabulary, i in S) and student
q = softmax(z / T):

  forward_kl (default)  T^2 * [ sum_S p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail) ]
  renormalized          T^2 * KL(p restricted to S, renormalised || q restricted to S, renormalised);
                        the only valid choice for raw top-k logits, whose tail mass is unknown
  reverse_kl            T^2 * KL(q || p) over the buckets S and tail (an approximation)
  jsd                   T^2 * JS(p, q) over the buckets S and tail (an approximation)

where x_tail = 1 - sum_S x_i, computed in fp32 as log(-expm1(logsumexp(log x_S))). With S the whole
vocabulary, forward_kl is exactly the full KL divergence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSSES = ("forward_kl", "renormalized", "reverse_kl", "jsd")
# log(1 - x) for x within ~1e-30 of 1 stays finite: the tail of a stored set that covers (almost)
# all the mass contributes ~0 instead of 0 * -inf = NaN.
_NEAR_ZERO = -1e-30


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both ends (Maechler 2012)."""
    x = x.clamp(max=_NEAR_ZERO)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _bucket_kl(log_a: torch.Tensor, log_a_tail: torch.Tensor, log_b: torch.Tensor, log_b_tail: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the buckets S (last dim) and tail."""
    body = (log_a.exp() * (log_a - log_b)).sum(-1)
    return body + log_a_tail.exp() * (log_a_tail - log_b_tail)


def sparse_kd(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logp: torch.Tensor,
              loss: str = "forward_kl", temperature: float = 1.0) -> torch.Tensor:
    """Per-position loss [n] for student logits [n, V], stored ids [n, k] and teacher values [n, k]."""
    log_q_all = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q = log_q_all.gather(-1, ids)
    log_p = teacher_logp.float()
    if loss == "renormalized":
        log_p_hat = F.log_softmax(log_p, dim=-1)
        per_position = (log_p_hat.exp() * (log_p_hat - F.log_softmax(log_q, dim=-1))).sum(-1)
    else:
        log_p_tail = log1mexp(torch.logsumexp(log_p, dim=-1))
        log_q_tail = log1mexp(torch.logsumexp(log_q, dim=-1))
        if loss == "forward_kl":
            per_position = _bucket_kl(log_p, log_p_tail, log_q, log_q_tail)
        elif loss == "reverse_kl":
            per_position = _bucket_kl(log_q, log_q_tail, log_p, log_p_tail)
        elif loss == "jsd":
            log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0))
            log_m_tail = torch.logaddexp(log_p_tail, log_q_tail) - torch.log(torch.tensor(2.0))
            per_position = 0.5 * (_bucket_kl(log_p, log_p_tail, log_m, log_m_tail)
                                  + _bucket_kl(log_q, log_q_tail, log_m, log_m_tail))
        else:
            raise ValueError(f"unknown distillation loss {loss!r}; one of {', '.join(LOSSES)}")
    return per_position * temperature ** 2


def _chunk_sums(hidden, head, ids, teacher_logp, labels, loss, temperature):
    logits = head(hidden)
    kd = sparse_kd(logits, ids, teacher_logp, loss, temperature).sum()
    ce = F.cross_entropy(logits.float(), labels, reduction="sum")
    return kd, ce


def distill_loss(hidden: torch.Tensor, head: torch.nn.Module, ids: torch.Tensor, teacher_logp: torch.Tensor,
                 labels: torch.Tensor, alpha: float = 1.0, loss: str = "forward_kl", temperature: float = 1.0,
                 chunk_size: int = 1024) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha * KD + (1 - alpha) * CE, each averaged over all given positions (the batch's valid tokens).

    `hidden` [N, H] are the student's final hidden states at valid positions only; logits are made
    `chunk_size` positions at a time and recomputed in backward, so no [N, V] tensor is ever held.
    """
    n = hidden.shape[0]
    kd_total = hidden.new_zeros((), dtype=torch.float32)
    ce_total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        part = slice(start, start + chunk_size)
        args = (hidden[part], head, ids[part], teacher_logp[part], labels[part], loss, temperature)
        if torch.is_grad_enabled() and hidden.requires_grad:
            kd, ce = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            kd, ce = _chunk_sums(*args)
        kd_total = kd_total + kd
        ce_total = ce_total + ce
    denominator = max(n, 1)
    kd_mean, ce_mean = kd_total / denominator, ce_total / denominator
    total = alpha * kd_mean + (1 - alpha) * ce_mean
    return total, {"kd_loss": float(kd_mean.detach()), "ce_loss": float(ce_mean.detach())}
