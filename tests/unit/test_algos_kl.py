import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import AdaptiveKLController, FixedKLController, kl_penalty


def test_estimators_by_hand() -> None:
    logprobs = torch.tensor([-1.0, -2.0, -0.5])
    ref_logprobs = torch.tensor([-1.5, -1.0, -0.5])
    d = [0.5, -1.0, 0.0]  # logprobs - ref_logprobs
    assert_close(kl_penalty(logprobs, ref_logprobs, "k1"), torch.tensor(d))
    assert_close(kl_penalty(logprobs, ref_logprobs, "k2"), torch.tensor([0.125, 0.5, 0.0]))
    assert_close(kl_penalty(logprobs, ref_logprobs, "abs"), torch.tensor([0.5, 1.0, 0.0]))
    k3 = [math.exp(-x) + x - 1 for x in d]  # exp(ref - logp) - (ref - logp) - 1
    assert_close(kl_penalty(logprobs, ref_logprobs, "k3"), torch.tensor(k3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k3_is_nonnegative_everywhere_and_zero_at_equality(dtype: torch.dtype) -> None:
    magnitudes = torch.logspace(-12, 1.5, 2000, dtype=torch.float64)
    diffs = torch.cat([-magnitudes, magnitudes, torch.zeros(1, dtype=torch.float64)])
    base = torch.linspace(-30.0, 0.0, diffs.numel(), dtype=torch.float64)
    logprobs, ref_logprobs = (base + diffs).to(dtype), base.to(dtype)
    k3 = kl_penalty(logprobs, ref_logprobs, "k3")
    assert (k3 >= 0).all()
    same = torch.randn(100, dtype=dtype)
    assert (kl_penalty(same, same.clone(), "k3") == 0).all()


def test_k3_is_accurate_near_zero() -> None:
    d = torch.logspace(-8, -3, 50, dtype=torch.float64)
    taylor = d**2 / 2 - d**3 / 6 + d**4 / 24  # exp(-d) + d - 1, truncation error ~d^5
    k3 = kl_penalty(d, torch.zeros_like(d), "k3")
    # atol=0: the default float64 atol (1e-7) would accept anything at this scale.
    assert_close(k3, taylor, rtol=1e-7, atol=0)
    naive = torch.exp(-d) + d - 1  # the cancellation that expm1 avoids
    with pytest.raises(AssertionError):
        assert_close(naive, taylor, rtol=1e-7, atol=0)


def test_unbiased_estimators_match_the_analytic_kl_in_expectation() -> None:
    gen = torch.Generator().manual_seed(0)
    policy = torch.softmax(torch.randn(10, generator=gen, dtype=torch.float64), -1)
    ref = torch.softmax(torch.randn(10, generator=gen, dtype=torch.float64), -1)
    kl = (policy * (policy.log() - ref.log())).sum()
    tokens = torch.multinomial(policy, 200_000, replacement=True, generator=gen)
    for kind in ("k1", "k3"):
        samples = kl_penalty(policy.log()[tokens], ref.log()[tokens], kind)
        standard_error = samples.std() / math.sqrt(samples.numel())
        # A fixed seed makes this deterministic; 4 standard errors would fail by chance 6e-5 of the time.
        assert abs(samples.mean() - kl) < 4 * standard_error, kind


def test_unknown_kind_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="k1, k2, k3, abs"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


def test_adaptive_controller_by_hand() -> None:
    controller = AdaptiveKLController(beta=0.1, target=6.0, horizon=10_000)
    # error = 9 / 6 - 1 = 0.5, clipped to 0.2: beta = 0.1 * (1 + 0.2 * 256 / 10000)
    assert controller.update(current_kl=9.0, n_steps=256) == pytest.approx(0.100512, rel=1e-12)
    # error = 5.7 / 6 - 1 = -0.05: beta = 0.100512 * (1 - 0.05 * 100 / 10000)
    assert controller.update(current_kl=5.7, n_steps=100) == pytest.approx(0.100461744, rel=1e-12)
    # error = -1, clipped to -0.2: beta = 0.100461744 * (1 - 0.2 * 5000 / 10000)
    assert controller.update(current_kl=0.0, n_steps=5000) == pytest.approx(0.0904155696, rel=1e-12)
    assert controller.beta == pytest.approx(0.0904155696, rel=1e-12)


def test_adaptive_controller_state_round_trip() -> None:
    controller = AdaptiveKLController(beta=0.2, target=1.0, horizon=100)
    controller.update(current_kl=3.0, n_steps=10)
    restored = AdaptiveKLController(beta=0.2, target=1.0, horizon=100)
    restored.load_state_dict(controller.state_dict())
    assert restored.beta == controller.beta
    assert restored.update(0.5, 7) == controller.update(0.5, 7)


def test_fixed_controller_never_moves() -> None:
    controller = FixedKLController(beta=0.05)
    assert controller.update(current_kl=100.0, n_steps=1000) == 0.05
    assert controller.beta == 0.05
