"""Reward shaping of the RL stages against hand-computed examples and plain loops: the score lands on the last real
token (either padding side, holes in the mask), the KL-penalised per-token reward, the missing-EOS penalty, the
critic's explained variance, and the groups whose advantages are all zero."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import (
    best_worst_pairs,
    explained_variance,
    group_success_band,
    last_token_index,
    missing_eos_penalty,
    score_at_last_token,
    token_rewards,
    zero_advantage_groups,
)


def test_the_score_lands_on_the_last_real_token_with_left_and_right_padding():
    scores = torch.tensor([1.5, -2.0, 3.0])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    left = right.flip(-1)
    assert torch.equal(score_at_last_token(scores, right), torch.tensor([[0, 0, 1.5, 0, 0], [-2.0, 0, 0, 0, 0],
                                                                         [0, 0, 0, 0, 3.0]]))
    assert torch.equal(score_at_last_token(scores, left), torch.tensor([[0, 0, 0, 0, 1.5], [0, 0, 0, 0, -2.0],
                                                                        [0, 0, 0, 0, 3.0]]))
    holes = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 0, 0], [1, 1, 0, 0, 1]])  # masked positions inside a row
    assert torch.equal(score_at_last_token(scores, holes), torch.tensor([[0, 0, 1.5, 0, 0], [0, 0, -2.0, 0, 0],
                                                                         [0, 0, 0, 0, 3.0]]))
    assert last_token_index(holes).tolist() == [2, 2, 4]
    # An empty row has no last token: nothing is placed.
    assert torch.equal(score_at_last_token(torch.tensor([4.0]), torch.zeros(1, 3)), torch.zeros(1, 3))


def test_token_rewards_are_minus_beta_kl_plus_the_score_at_the_last_token():
    scores = torch.tensor([1.0, 0.5], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]])  # row 2: a hole before its tokens
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [9.0, -0.4, 0.5, 9.0]])  # 9: positions outside the mask
    expected = torch.tensor([[-0.01, -0.02, -0.03 + 1.0, 0.0], [0.0, 0.04, -0.05 + 0.5, 0.0]], dtype=torch.float64)
    assert_close(token_rewards(scores, mask, kl, beta=0.1), expected)
    assert_close(token_rewards(scores, mask), score_at_last_token(scores, mask))
    # The per-sequence sum is the KL-regularised return: score - beta * sum_t KL_t.
    generator = torch.Generator().manual_seed(0)
    scores, kl = torch.randn(6, generator=generator).double(), torch.randn(6, 9, generator=generator)
    mask = (torch.arange(9) < torch.randint(1, 10, (6, 1), generator=generator)).long()
    returns = token_rewards(scores, mask, kl, beta=0.3).sum(1)
    assert_close(returns, scores - 0.3 * (kl.double() * mask).sum(1))


def test_the_missing_eos_penalty_lowers_only_truncated_completions():
    scores = torch.tensor([1.0, 0.25, 0.0])
    truncated = torch.tensor([True, False, True])
    assert torch.equal(missing_eos_penalty(scores, truncated, 0.5), torch.tensor([0.5, 0.25, -0.5]))
    assert missing_eos_penalty(scores, truncated, None) is scores


def test_explained_variance_against_a_plain_computation():
    generator = torch.Generator().manual_seed(1)
    returns = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    values = returns + 0.3 * torch.randn(4, 6, generator=generator, dtype=torch.float64)
    mask = (torch.arange(6) < torch.tensor([[6], [3], [5], [1]])).long()
    r = [returns[b, t].item() for b in range(4) for t in range(6) if mask[b, t]]
    e = [returns[b, t].item() - values[b, t].item() for b in range(4) for t in range(6) if mask[b, t]]

    def variance(xs):  # unbiased, as masked_var
        mean = sum(xs) / len(xs)
        return sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)

    assert explained_variance(values, returns, mask) == pytest.approx(1 - variance(e) / variance(r), rel=1e-12)
    assert explained_variance(returns, returns, mask) == 1.0
    constant = torch.ones(2, 3, dtype=torch.float64)
    assert math.isnan(explained_variance(constant, constant, torch.ones(2, 3)))  # returns that do not vary


def test_zero_advantage_groups_by_id_wherever_the_rows_stand():
    advantages = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, -1e-30], [0.0, 0.0]])
    groups = torch.tensor([7, 3, 7, 3, 9, 9])  # group 7 all zero; 3 has one nonzero row; 9 a tiny nonzero
    assert zero_advantage_groups(advantages, groups).tolist() == [True, False, True, False, False, False]
    assert zero_advantage_groups(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)).tolist() == []


def test_group_success_band_against_a_plain_loop():
    generator = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 9, (60,), generator=generator) * 3  # ids in any order, not contiguous
    scores = torch.randint(0, 2, (60,), generator=generator).double()
    scores[groups == 6] = 1.0  # all right: no spread
    scores[groups == 9] = 0.0  # all wrong
    for low, high in ((0.0, 1.0), (0.25, 0.75), (0.5, 0.5)):
        band = group_success_band(scores, groups, low, high)
        assert band.groups.tolist() == sorted(set(groups.tolist()))
        for i, g in enumerate(band.groups.tolist()):
            mine = [s for s, h in zip(scores.tolist(), groups.tolist(), strict=True) if h == g]
            mean = sum(mine) / len(mine)
            outside = max(low - mean, 0.0) + max(mean - high, 0.0)
            assert math.isclose(band.distance[i].item(), outside, abs_tol=1e-12)
            assert bool(band.spread[i]) == (max(mine) != min(mine))
            assert bool(band.keep[i]) == (max(mine) != min(mine) and low <= mean <= high)
    # DAPO's dynamic sampling: with the band [0, 1], exactly the groups with 0 < p < 1.
    band = group_success_band(torch.tensor([0.0, 0, 1, 1, 1, 1, 0, 1]), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 0, 1)
    assert band.keep.tolist() == [False, False, False, True]


def test_best_worst_pairs_against_a_plain_loop():
    generator = torch.Generator().manual_seed(1)
    groups = torch.randint(0, 7, (40,), generator=generator)
    scores = torch.randint(0, 4, (40,), generator=generator).double()
    scores[groups == 3] = 2.0  # a group whose completions all tie: no pair
    for margin in (0.0, 1.0, 2.5):
        expected = []
        for group in dict.fromkeys(groups.tolist()):  # groups in order of first appearance
            rows = [i for i in range(40) if groups[i] == group]
            best = max(rows, key=lambda i: (scores[i].item(), -i))  # the first of the best
            worst = min(rows, key=lambda i: (scores[i].item(), i))  # the first of the worst
            if scores[best] - scores[worst] > margin:
                expected.append((best, worst))
        assert best_worst_pairs(scores, groups, margin) == expected
    assert all(groups[c] != 3 for c, _ in best_worst_pairs(scores, groups))
