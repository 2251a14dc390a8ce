"""Reference tests for the KTO loss: a batch worked by hand, a per-row loop on random batches, the reference
point clamped at 0 and carrying no gradient.

TRL 1.16's KTO loss lives inside `KTOTrainer._compute_loss` (it needs a model and an accelerator), so there is
no model-free callable to compare against; the loop below follows the paper's eq. 7-8 row by row instead."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from posttrain.algos import kto_loss


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_loss_by_hand() -> None:
    logprobs = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)
    ref = torch.tensor([-2.0, -2.0, -1.0], dtype=torch.float64)  # r = 1, 0, -2
    kl_logprobs = torch.tensor([-1.0, -3.0, -2.0], dtype=torch.float64)
    ref_kl = torch.tensor([-1.5, -2.5, -2.5], dtype=torch.float64)  # log-ratios 0.5, -0.5, 0.5: z0 = 1/6
    desirable = torch.tensor([True, False, True])
    out = kto_loss(logprobs, ref, kl_logprobs, ref_kl, desirable, beta=0.5, desirable_weight=2.0,
                   undesirable_weight=0.75)
    z0 = 1 / 6
    want = (2.0 * (1 - _sigmoid(0.5 * (1 - z0)))        # desirable, r = 1
            + 0.75 * (1 - _sigmoid(0.5 * (z0 - 0)))     # undesirable, r = 0
            + 2.0 * (1 - _sigmoid(0.5 * (-2 - z0)))) / 3  # desirable, r = -2
    assert_close(out.loss, torch.tensor(want, dtype=torch.float64))
    assert_close(out.kl, torch.tensor(z0, dtype=torch.float64))
    assert_close(out.rewards, torch.tensor([0.5, 0.0, -1.0], dtype=torch.float64))


def test_the_policy_at_the_reference_loses_half_per_row() -> None:
    logprobs = torch.tensor([-4.0, -7.0, -1.5, -2.0])
    desirable = torch.tensor([True, False, False, True])
    out = kto_loss(logprobs, logprobs, logprobs.flip(0), logprobs.flip(0), desirable, desirable_weight=1.0,
                   undesirable_weight=3.0)
    # r = 0 and z0 = 0: every row's value is sigmoid(0) = 1/2
    assert_close(out.loss, torch.tensor((0.5 + 1.5 + 1.5 + 0.5) / 4))
    assert_close(out.rewards, torch.zeros(4))
    assert out.kl == 0


def test_a_negative_kl_estimate_is_clamped_to_zero() -> None:
    logprobs, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    clamped = kto_loss(logprobs, ref, torch.tensor([-3.0, -3.0]), torch.tensor([-2.0, -1.0]),
                       torch.tensor([True, False]), beta=1.0)
    zero = kto_loss(logprobs, ref, torch.zeros(2), torch.zeros(2), torch.tensor([True, False]), beta=1.0)
    assert clamped.kl == 0
    assert_close(clamped.loss, zero.loss)


def _loop_reference(logprobs, ref, kl_logprobs, ref_kl, desirable, beta, w_d, w_u) -> tuple[float, float]:
    estimate = sum(a - b for a, b in zip(kl_logprobs, ref_kl, strict=True)) / len(kl_logprobs)
    z0 = max(0.0, estimate)
    total = 0.0
    for lp, rf, good in zip(logprobs, ref, desirable, strict=True):
        r = lp - rf
        total += w_d * (1 - _sigmoid(beta * (r - z0))) if good else w_u * (1 - _sigmoid(beta * (z0 - r)))
    return total / len(logprobs), z0


def test_kto_loss_matches_a_per_row_loop_on_random_batches() -> None:
    gen = torch.Generator().manual_seed(0)
    for size in (1, 2, 5, 16):
        logprobs = -torch.rand(size, generator=gen, dtype=torch.float64) * 20
        ref = logprobs + torch.randn(size, generator=gen, dtype=torch.float64) * 3
        kl_logprobs = -torch.rand(size, generator=gen, dtype=torch.float64) * 20
        ref_kl = kl_logprobs - torch.randn(size, generator=gen, dtype=torch.float64) + 0.3
        desirable = torch.rand(size, generator=gen) < 0.5
        beta, w_d, w_u = 0.2, 1.0, 1.33
        out = kto_loss(logprobs, ref, kl_logprobs, ref_kl, desirable, beta, w_d, w_u)
        loss, z0 = _loop_reference(logprobs.tolist(), ref.tolist(), kl_logprobs.tolist(), ref_kl.tolist(),
                                   desirable.tolist(), beta, w_d, w_u)
        # float64 round-off only (a weight of 1.33 once went through float32: 3e-8 off)
        assert_close(out.loss, torch.tensor(loss, dtype=torch.float64), rtol=1e-13, atol=1e-15)
        assert_close(out.kl, torch.tensor(z0, dtype=torch.float64), rtol=1e-13, atol=1e-15)


def test_no_gradient_flows_through_the_reference_point() -> None:
    logprobs = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    kl_logprobs = torch.tensor([-1.0, -1.0, -1.0], requires_grad=True)
    out = kto_loss(logprobs, torch.full((3,), -2.0), kl_logprobs, torch.full((3,), -2.0),
                   torch.tensor([True, False, True]))
    out.loss.backward()
    assert kl_logprobs.grad is None
    # d/dr of lambda_D (1 - sigmoid(beta (r - z0))) = -lambda_D beta s (1 - s): a desirable row's logprob goes up,
    # an undesirable one's down
    assert logprobs.grad[0] < 0 and logprobs.grad[1] > 0 and logprobs.grad[2] < 0
    s = _sigmoid(0.1 * (1.0 - 1.0))  # row 0: r = 1, z0 = 1
    assert_close(logprobs.grad[0], torch.tensor(-0.1 * s * (1 - s) / 3))
    assert not out.rewards.requires_grad and not out.kl.requires_grad
