"""Reference tests for the preference-learning additions: listwise DPO, reward centering, PRM loss."""

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import dpo_loss, dpo_plackett_luce_loss, process_reward_loss, reward_centering_penalty


def _ranking_probability(rewards: list[float]) -> float:
    """P(order) under Plackett-Luce, by enumerating the sequential choices."""
    p, remaining = 1.0, list(rewards)
    for r in rewards:
        p *= math.exp(r) / sum(math.exp(x) for x in remaining)
        remaining.remove(r)
    return p


def test_listwise_dpo_with_two_responses_is_pairwise_sigmoid_dpo() -> None:
    gen = torch.Generator().manual_seed(0)
    logprobs, ref = torch.randn(6, 2, generator=gen), torch.randn(6, 2, generator=gen)
    listwise = dpo_plackett_luce_loss(logprobs, ref, beta=0.3)
    pairwise = dpo_loss(logprobs[:, 0], logprobs[:, 1], ref[:, 0], ref[:, 1], beta=0.3, kind="sigmoid")
    assert_close(listwise.loss, pairwise.loss)
    assert_close(listwise.rewards, torch.stack([pairwise.chosen_rewards, pairwise.rejected_rewards], 1))


def test_listwise_dpo_is_the_ranking_likelihood_of_the_implicit_rewards() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -4.0], [-3.0, -1.0, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[-2.0, -2.0, -2.0], [-1.0, -2.0, -3.0]], dtype=torch.float64)
    beta = 0.5
    want = [-math.log(_ranking_probability([beta * (a - b) for a, b in zip(lp, rf, strict=True)]))
            for lp, rf in zip(logprobs.tolist(), ref.tolist(), strict=True)]
    out = dpo_plackett_luce_loss(logprobs, ref, beta=beta)
    assert_close(out.loss, torch.tensor(sum(want) / 2, dtype=torch.float64))
    assert not out.rewards.requires_grad


def test_listwise_dpo_ragged_rankings_ignore_absent_responses() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -4.0], [-3.0, -1.0, 123.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-2.0, -2.0, -2.0], [-1.0, -2.0, -7.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = dpo_plackett_luce_loss(logprobs, ref, mask, beta=1.0)
    full = dpo_plackett_luce_loss(logprobs[:1], ref[:1], beta=1.0).loss
    pair = dpo_plackett_luce_loss(logprobs[1:, :2], ref[1:, :2], beta=1.0).loss
    assert_close(out.loss, (full + pair) / 2)
    assert out.rewards[1, 2] == 0
    out.loss.backward()
    assert logprobs.grad[1, 2] == 0


def test_listwise_dpo_is_minimised_by_the_ranked_order() -> None:
    rewards = torch.tensor([1.0, 0.0, -1.0])
    losses = {order: dpo_plackett_luce_loss(rewards[list(order)].unsqueeze(0), torch.zeros(1, 3)).loss.item()
              for order in itertools.permutations(range(3))}
    assert min(losses, key=losses.get) == (0, 1, 2)


def test_reward_centering_by_hand() -> None:
    rewards = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [3.0, 4.0]])
    assert_close(reward_centering_penalty(rewards), torch.tensor((9.0 + 0.25 + 49.0) / 3))
    mask = torch.tensor([[1, 1], [1, 1], [1, 0]])
    assert_close(reward_centering_penalty(rewards, mask), torch.tensor((9.0 + 0.25 + 9.0) / 3))
    # differences are untouched: shifting every reward by c changes only the penalty
    assert reward_centering_penalty(rewards - rewards.mean(-1, keepdim=True)) == 0


def test_process_reward_loss_by_hand() -> None:
    scores = torch.tensor([[2.0, -1.0, 5.0], [0.0, 3.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])

    def bce(s: float, y: float) -> float:
        p = 1 / (1 + math.exp(-s))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    terms = [bce(2.0, 1.0), bce(-1.0, 0.0), bce(0.0, 1.0), bce(3.0, 0.0)]
    assert_close(process_reward_loss(scores, labels, mask), torch.tensor(sum(terms) / 4))
    assert_close(process_reward_loss(scores, labels, mask, normaliser=10), torch.tensor(sum(terms) / 10))
    squares = [(2.0 - 1.0) ** 2, (-1.0 - 0.0) ** 2, (0.0 - 1.0) ** 2, (3.0 - 0.0) ** 2]
    assert_close(process_reward_loss(scores, labels, mask, kind="regression"), torch.tensor(sum(squares) / 4))
    soft = torch.tensor([[0.25, 0.0, 0.0], [0.5, 0.0, 0.0]])
    assert_close(process_reward_loss(scores[:, :1], soft[:, :1], mask[:, :1]),
                 torch.tensor((bce(2.0, 0.25) + bce(0.0, 0.5)) / 2))


def test_process_reward_loss_unknown_kind() -> None:
    with pytest.raises(ValueError, match="classification, regression"):
        process_reward_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), kind="ranking")
