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
@pytest.mark.slow
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


@pytest.mark.slow
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
    assert float(grads[0][3]["kd_loss"]) == pytest.approx(float(kd), rel=1e-5)


def _bucketed_reference(student, ids, values):
    """float64 forward KL over the buckets S and tail, the student's tail summed over the ids not stored."""
    q = F.log_softmax(student.double(), -1)
    log_p = values.double()
    p_tail = 1 - log_p.exp().sum(-1)
    stored = torch.zeros_like(q, dtype=torch.bool).scatter(-1, ids, True)
    q_tail = torch.where(stored, torch.zeros_like(q), q.exp()).sum(-1)
    body = (log_p.exp() * (log_p - q.gather(-1, ids))).sum(-1)
    return body + p_tail * (p_tail.log() - q_tail.log())


def test_confident_student_equals_the_float64_reference_in_value_and_gradient():
    teacher, student = teacher_and_student(n=4)
    student = student.clone()
    student[:, 0] += 40.0  # the student puts all but ~1e-16 of its mass on token 0
    ids, values = topk_targets(teacher, 8)
    ids[:, -1] = 0  # and token 0 is among the stored targets, so the student's tail is tiny
    values = F.log_softmax(teacher, -1).gather(-1, ids)
    z32 = student.clone().requires_grad_(True)
    got = sparse_kd(z32, ids, values)
    z64 = student.double().clone().requires_grad_(True)
    want = _bucketed_reference(z64, ids, values)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(z32.grad.double(), z64.grad, rtol=1e-4, atol=1e-7)
    tail_ids = torch.ones(V, dtype=torch.bool)
    tail_ids[ids[0]] = False
    assert z32.grad[0, tail_ids].abs().max() > 1e-6  # the tail logits are pushed up, not frozen


def test_self_distillation_at_k_equals_v_starts_at_zero():
    _, student = teacher_and_student()
    student = student * 10  # confident, as a trained model is
    ids, values = topk_targets(student, V)
    assert sparse_kd(student, ids, values).abs().max() <= 1e-6


def _with_duplicates(ids, values, seed=0):
    """The same targets with repeated ids appended, as sampled captures store them."""
    g = torch.Generator().manual_seed(seed)
    extra = torch.randint(0, ids.shape[1], (ids.shape[0], 4), generator=g)
    return (torch.cat([ids, ids.gather(-1, extra)], -1),
            torch.cat([values, torch.full(extra.shape, -15.0)], -1))


@pytest.mark.parametrize("loss", ["forward_kl", "renormalized", "reverse_kl", "jsd"])
def test_repeated_ids_give_the_loss_of_the_unique_targets(loss):
    teacher, student = teacher_and_student()
    ids, values = topk_targets(teacher, 8)
    dup_ids, dup_values = _with_duplicates(ids, values)
    torch.testing.assert_close(sparse_kd(student, dup_ids, dup_values, loss),
                               sparse_kd(student, ids, values, loss), rtol=1e-5, atol=1e-6)


def test_a_stored_teacher_tail_makes_quantised_values_one_distribution():
    teacher, student = teacher_and_student()
    ids, values = topk_targets(teacher * 4, 8)  # a confident teacher
    exact_tail = log1mexp(torch.logsumexp(values, -1))
    rounded = torch.round(values * 32) / 32  # q10-style rounding: the top value becomes 0 (p = 1)
    got = sparse_kd(student, ids, rounded, teacher_tail=exact_tail)
    torch.testing.assert_close(got, sparse_kd(student, ids, values), rtol=0.05, atol=0.02)
    assert torch.isfinite(got).all()


def test_no_cross_entropy_is_computed_at_alpha_one(monkeypatch):
    calls = []
    real = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden = torch.randn(10, 8)
    head = torch.nn.Linear(8, V, bias=False)
    ids, values = topk_targets(torch.randn(10, V), 4)
    _, parts = distill_loss(hidden, head, ids, values, torch.zeros(10, dtype=torch.long), alpha=1.0)
    assert calls == [] and "ce_loss" not in parts
    distill_loss(hidden, head, ids, values, torch.zeros(10, dtype=torch.long), alpha=0.5)
    assert calls


def test_vllm_prompt_logprobs_convert_to_our_alignment_with_objects_built_here():
    """vLLM cannot run on these CPU machines: this checks the conversion on prompt_logprobs objects built
    in the test, shaped as vLLM returns them (None first; top-k plus the actual token as a (k+1)-th
    entry when it is not in the top-k)."""
    import math
    from types import SimpleNamespace

    from posttrain.kd.vllm_targets import from_prompt_logprobs

    def lp(value, rank):
        return SimpleNamespace(logprob=value, rank=rank, decoded_token="?")

    prompt = [None,
              {7: lp(-0.1, 1), 3: lp(-2.5, 2), 9: lp(-6.0, 9)},   # token 9 is the actual token, rank 9
              {4: lp(-0.7, 1), 5: lp(-0.9, 2)}]
    ids, values, tails = from_prompt_logprobs(prompt, k=2)
    assert ids.tolist()[:2] == [[7, 3], [4, 5]]  # position 0 holds the distribution of token 1
    assert values[0].tolist() == pytest.approx([-0.1, -2.5]) and values[1].tolist() == pytest.approx([-0.7, -0.9])
    assert tails[0] == pytest.approx(math.log(1 - math.exp(-0.1) - math.exp(-2.5)), rel=1e-6)
    assert values[2].tolist() == [-math.inf, -math.inf] and tails[2] == 0.0  # last position: never trained on
    with pytest.raises(ValueError, match="fewer than k"):
        from_prompt_logprobs(prompt, k=3)


@pytest.mark.parametrize("loss", ["forward_kl", "renormalized", "reverse_kl", "jsd"])
@pytest.mark.parametrize("alpha", [1.0, 0.6])
@pytest.mark.slow
def test_the_fused_loss_equals_the_checkpointed_one_in_value_and_gradient(loss, alpha):
    """kd/fused.py makes each chunk's gradient in the forward; value, hidden-state and head gradients
    equal kd/losses.py's chunked, checkpointed loss, with a stored tail and an outside normalizer."""
    from posttrain.kd.fused import fused_distill_loss

    torch.manual_seed(1)
    head = torch.nn.Linear(16, V, bias=False)
    base = torch.randn(29, 16)
    teacher = torch.randn(29, V) * 2
    ids, values = topk_targets(teacher, 6)
    tail = log1mexp(torch.logsumexp(values, -1))
    labels = torch.randint(0, V, (29,))
    runs = []
    for fn in (distill_loss, fused_distill_loss):
        hidden = base.clone().requires_grad_(True)
        head.weight.grad = None
        total, parts = fn(hidden, head, ids, values, labels, alpha=alpha, loss=loss, temperature=2.0,
                          chunk_size=8, teacher_tail=tail, normalizer=torch.tensor(40.0))
        (3.0 * total).backward()  # a scaled upstream gradient reaches both the same way
        runs.append((total.detach(), hidden.grad, head.weight.grad.clone(), parts))
    (total_a, hidden_a, head_a, parts_a), (total_b, hidden_b, head_b, parts_b) = runs
    torch.testing.assert_close(total_b, total_a)
    torch.testing.assert_close(hidden_b, hidden_a)
    torch.testing.assert_close(head_b, head_a)
    assert set(parts_b) == set(parts_a)
    for key, value in parts_a.items():
        assert isinstance(parts_b[key], torch.Tensor)  # left on the device: no sync per micro-batch
        assert float(parts_b[key]) == pytest.approx(value, rel=1e-5)


def test_the_fused_loss_equals_the_float64_reference_for_a_confident_student():
    """Through the head: hidden states whose logits put all but ~1e-16 of the mass on one stored token."""
    from posttrain.kd.fused import fused_distill_loss

    torch.manual_seed(2)
    hidden = torch.randn(4, 8)
    weight = torch.randn(V, 8) * 0.1
    weight[0] = hidden.mean(0) * 0 + 1.0
    hidden[:, :] = hidden.abs() + 5.0  # logit 0 is ~40 above the rest
    teacher = torch.randn(4, V) * 2
    ids, _ = topk_targets(teacher, 8)
    ids[:, -1] = 0
    values = F.log_softmax(teacher, -1).gather(-1, ids)
    head = torch.nn.Linear(8, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    h32 = hidden.clone().requires_grad_(True)
    total, _ = fused_distill_loss(h32, head, ids, values, torch.zeros(4, dtype=torch.long), chunk_size=3)
    total.backward()
    h64 = hidden.double().clone().requires_grad_(True)
    want = _bucketed_reference(h64 @ weight.double().T, ids, values).mean()
    want.backward()
    torch.testing.assert_close(total.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h32.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)


def test_the_fused_loss_without_gradients_is_the_plain_one():
    from posttrain.kd.fused import fused_distill_loss

    head = torch.nn.Linear(8, V, bias=False)
    hidden = torch.randn(5, 8)
    ids, values = topk_targets(torch.randn(5, V), 4)
    with torch.no_grad():
        a, _ = fused_distill_loss(hidden, head, ids, values, torch.zeros(5, dtype=torch.long))
    b, _ = distill_loss(hidden, head, ids, values, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(a, b)
