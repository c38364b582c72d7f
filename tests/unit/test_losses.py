"""KD loss math against hand-computed values (no Ray)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distilray.losses import cosine_hidden_loss, distillation_loss, soft_target_kl


def hand_kl(teacher: list[float], student: list[float], t: float) -> float:
    """KL(softmax(teacher/t) ‖ softmax(student/t)) written out with math.exp."""
    def softmax(xs):
        e = [math.exp(x / t) for x in xs]
        return [v / sum(e) for v in e]

    p, q = softmax(teacher), softmax(student)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def test_kl_matches_hand_computed_value_times_t_squared():
    s, t = [1.0, 2.0, 0.0], [0.5, 0.2, 2.0]
    for temperature in (1.0, 2.0, 4.0):
        got = soft_target_kl(torch.tensor([s]), torch.tensor([t]), temperature).item()
        assert got == pytest.approx(temperature**2 * hand_kl(t, s, temperature), rel=1e-5)
    # T = 1, by hand: p = softmax(t), q = softmax(s)
    assert soft_target_kl(torch.tensor([s]), torch.tensor([t]), 1.0).item() == pytest.approx(1.2253, abs=1e-4)


def test_kl_is_averaged_over_the_batch():
    s = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    t = torch.tensor([[0.5, 0.2, 2.0], [1.0, -1.0, 0.0]])
    expected = (hand_kl(t[0].tolist(), s[0].tolist(), 2.0) + hand_kl(t[1].tolist(), s[1].tolist(), 2.0)) / 2
    assert soft_target_kl(s, t, 2.0).item() == pytest.approx(4 * expected, rel=1e-5)
    assert soft_target_kl(s.repeat(3, 1), t.repeat(3, 1), 2.0).item() == pytest.approx(
        soft_target_kl(s, t, 2.0).item(), rel=1e-6)


def _soft_grad(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    s = s.clone().requires_grad_(True)
    soft_target_kl(s, t, temperature).backward()
    return s.grad


def test_t_squared_keeps_gradient_size_independent_of_temperature():
    s = torch.tensor([[1.0, 2.0, 0.0, -1.0]])
    t = torch.tensor([[0.5, 0.2, 2.0, 0.3]])
    # d/ds of T²·KL at temperature T is T·(softmax(s/T) − softmax(t/T)), exactly:
    for temperature in (1.0, 3.0):
        expected = temperature * (F.softmax(s / temperature, -1) - F.softmax(t / temperature, -1))
        assert torch.allclose(_soft_grad(s, t, temperature), expected, atol=1e-6)
    # ... which tends to the centred logit difference / C as T grows: without T² it would be
    # 4× smaller at T=100 than at T=50.
    limit = ((s - s.mean()) - (t - t.mean())) / s.shape[-1]
    g50, g100 = _soft_grad(s, t, 50.0), _soft_grad(s, t, 100.0)
    assert torch.allclose(g50, limit, atol=6e-3) and torch.allclose(g100, limit, atol=3e-3)
    assert g100.norm() / g50.norm() == pytest.approx(1.0, abs=0.01)


def test_matching_logits_give_zero_kl_and_zero_gradient():
    t = torch.tensor([[0.3, -1.2], [2.0, 0.5], [0.0, 0.0]])
    s = t.clone().requires_grad_(True)
    loss = distillation_loss(s, t, torch.tensor([0, 1, 0]), temperature=3.0, alpha=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert torch.allclose(s.grad, torch.zeros_like(s), atol=1e-7)


def test_alpha_zero_is_plain_cross_entropy_and_ignores_the_teacher():
    s = torch.tensor([[1.0, -0.5], [0.2, 0.9], [-1.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 0])
    nan_teacher = torch.full((3, 2), float("nan"))
    loss = distillation_loss(s, nan_teacher, labels, temperature=2.0, alpha=0.0)
    ce = F.cross_entropy(s, labels)
    assert torch.equal(loss, ce)
    (g_loss,) = torch.autograd.grad(loss, s)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(s, labels), s)
    assert torch.equal(g_loss, g_ce)


def test_mixture_weights_kl_and_ce_and_teacher_gets_no_gradient():
    s = torch.tensor([[1.0, -0.5, 0.1], [0.2, 0.9, -0.3]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0, 0.5], [2.0, -1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([2, 1])
    loss = distillation_loss(s, t, labels, temperature=2.0, alpha=0.3)
    kl = sum(hand_kl(t[i].tolist(), s[i].tolist(), 2.0) for i in range(2)) / 2
    ce = F.cross_entropy(s, labels).item()
    assert loss.item() == pytest.approx(0.3 * 4 * kl + 0.7 * ce, rel=1e-5)
    loss.backward()
    assert t.grad is None and s.grad is not None


def test_cosine_loss_over_real_tokens_only():
    base = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert cosine_hidden_loss(base, base, mask).item() == pytest.approx(0.0, abs=1e-6)
    orthogonal = torch.tensor([[[0.0, 3.0], [-2.0, 0.0], [-5.0, -5.0]]])
    assert cosine_hidden_loss(base, orthogonal, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert cosine_hidden_loss(base, -base, mask).item() == pytest.approx(2.0, abs=1e-6)
    # the padded third token (opposite direction) does not count
    half = torch.tensor([[[1.0, 0.0], [0.0, -1.0], [-5.0, -5.0]]])
    assert cosine_hidden_loss(base, half, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert cosine_hidden_loss(base, half, torch.ones(1, 3)).item() == pytest.approx(4 / 3, abs=1e-6)


def test_cosine_loss_all_padding_is_zero_and_shapes_must_match():
    h = torch.randn(2, 4, 8)
    assert cosine_hidden_loss(h, torch.randn(2, 4, 8), torch.zeros(2, 4)).item() == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        cosine_hidden_loss(h, torch.randn(2, 4, 16), torch.ones(2, 4))
