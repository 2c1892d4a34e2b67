"""Distillation loss formulas: exact against full-vocabulary KL, finite at the edges, chunking exact."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from posttrain.kd.losses import distill_loss, log1mexp, sparse_kd

V = 50


def teacher_and_student(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g) * 2, torch.randn(n, V, generator=g) * 2


def topk_targets(teacher_logits, k, temperature=1.0):
    logp = F.log_softmax(teacher_logits / temperature, -1)
    values, ids = logp.topk(k, dim=-1)
    return ids, values


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_k_equals_v_is_exactly_full_kl(temperature):
    teacher, student = teacher_and_student()
    ids, values = topk_targets(teacher, V, temperature)
    got = sparse_kd(student, ids, values, "forward_kl", temperature)
    p = F.log_softmax(teacher / temperature, -1)
    q = F.log_softmax(student / temperature, -1)
    full = (p.exp() * (p - q)).sum(-1) * temperature ** 2
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def test_forward_kl_with_tail_is_the_kl_of_the_bucketed_distributions():
    teacher, student = teacher_and_student()
    ids, values = topk_targets(teacher, 8)
    p, q = F.softmax(teacher, -1), F.softmax(student, -1)
    p_s, q_s = p.gather(-1, ids), q.gather(-1, ids)
    p_tail, q_tail = 1 - p_s.sum(-1), 1 - q_s.sum(-1)
    expected = (p_s * (p_s.log() - q_s.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    torch.testing.assert_close(sparse_kd(student, ids, values), expected, atol=1e-5, rtol=1e-5)
    assert torch.all(sparse_kd(student, ids, values) >= -1e-6)


def test_identical_student_gives_zero_for_every_loss():
    teacher, _ = teacher_and_student()
    ids, values = topk_targets(teacher, 8)
    for loss in ("forward_kl", "renormalized", "reverse_kl", "jsd"):
        torch.testing.assert_close(sparse_kd(teacher, ids, values, loss), torch.zeros(6), atol=1e-5, rtol=0)


def test_renormalized_ignores_the_unknown_tail_and_accepts_raw_logits():
    teacher, student = teacher_and_student()
    ids, _ = topk_targets(teacher, 8)
    raw = teacher.gather(-1, ids)  # raw logits, as in arcee-ai/LLama-405B-Logits
    shifted = raw + 7.0  # raw logits are only defined up to a constant
    a = sparse_kd(student, ids, raw, "renormalized")
    torch.testing.assert_close(a, sparse_kd(student, ids, shifted, "renormalized"))
    p_hat = F.softmax(raw, -1)
    q_hat = F.softmax(student.gather(-1, ids), -1)
    torch.testing.assert_close(a, (p_hat * (p_hat.log() - q_hat.log())).sum(-1), atol=1e-5, rtol=1e-5)


def test_no_nan_when_the_tail_is_zero_or_the_student_has_no_tail_mass():
    teacher, student = teacher_and_student()
    ids, values = topk_targets(teacher, V)
    student = student.clone().requires_grad_()
    loss = sparse_kd(student * 50, ids, values).sum()  # extreme student logits
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert torch.isfinite(log1mexp(torch.tensor([0.0, -1e-40, -1e-3, -50.0]))).all()


def test_position_t_pairs_with_the_students_logits_at_t():
    """Off-by-one check: a student equal to the teacher has zero loss only when aligned."""
    teacher, _ = teacher_and_student(n=10)
    ids, values = topk_targets(teacher, 8)
    aligned = sparse_kd(teacher, ids, values).mean()
    shifted = sparse_kd(teacher[1:], ids[:-1], values[:-1]).mean()
    assert aligned < 1e-6 and shifted > 0.1


def test_chunked_loss_equals_unchunked_in_value_and_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, V, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    teacher = torch.randn(37, V) * 2
    ids, values = topk_targets(teacher, 5)
    labels = torch.randint(0, V, (37,))
    grads = []
    for chunk in (1000, 8):
        hidden.grad, head.weight.grad = None, None
        total, parts = distill_loss(hidden, head, ids, values, labels, alpha=0.7, chunk_size=chunk)
        total.backward()
        grads.append((total.detach(), hidden.grad.clone(), head.weight.grad.clone(), parts))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    torch.testing.assert_close(grads[0][2], grads[1][2])
    with torch.no_grad():
        logits = head(hidden)
        kd = sparse_kd(logits, ids, values).mean()
        ce = F.cross_entropy(logits, labels)
    torch.testing.assert_close(grads[0][0], 0.7 * kd + 0.3 * ce)
    assert grads[0][3]["kd_loss"] == pytest.approx(float(kd), rel=1e-5)
