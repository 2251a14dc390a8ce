"""Comparison batches and reward-model metrics, by hand."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from posttrain.data.collate import collate_pairs, collate_rankings
from posttrain.eval.rewards import ScoredComparison, comparison_metrics, first_bad, good_steps
from posttrain.train.comparisons import (
    comparison_matrix,
    join_rows,
    ordered_pair_accuracy,
    ordered_pairs,
    split_rows,
)


def _pair(n: int) -> dict:
    return {"chosen_input_ids": [1] * n, "chosen_response_mask": [0] + [1] * (n - 1),
            "rejected_input_ids": [2] * (n + 1), "rejected_response_mask": [0] + [1] * n}


def _ranking(k: int) -> dict:
    return {"ranked_input_ids": [[1, 2 + i] for i in range(k)], "ranked_response_mask": [[0, 1]] * k}


def test_comparison_matrix_of_pairs_and_ragged_rankings() -> None:
    pairs = collate_pairs([_pair(2), _pair(3), _pair(4)], pad_token_id=0)
    values = torch.tensor([1.0, 2.0, 3.0, -1.0, -2.0, -3.0])  # chosen rows first, then rejected
    matrix, mask = comparison_matrix(values, pairs)
    assert matrix.tolist() == [[1.0, -1.0], [2.0, -2.0], [3.0, -3.0]] and mask.all()
    rankings = collate_rankings([_ranking(3), _ranking(2)], pad_token_id=0)
    matrix, mask = comparison_matrix(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), rankings)
    assert matrix.tolist() == [[5.0, 4.0, 3.0], [2.0, 1.0, 0.0]]
    assert mask.tolist() == [[True, True, True], [True, True, False]]


@pytest.mark.parametrize("ranking", [False, True])
def test_split_and_join_rows_are_inverse(ranking: bool) -> None:
    batch = (collate_rankings([_ranking(3), _ranking(2), _ranking(4)], 0) if ranking
             else collate_pairs([_pair(2), _pair(3)], 0))
    values = torch.arange(float(len(batch["input_ids"])))
    rows = split_rows(values, batch)
    assert [len(r) for r in rows] == ([3, 2, 4] if ranking else [2, 2])
    assert_close(join_rows(rows, ranking), values)


def test_ordered_pair_accuracy_and_margins_by_hand() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 0.0], [2.0, 2.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, False]])
    # row 0: (3>1 ok, 3>2 ok, 1>2 wrong); row 1: 0>1 wrong; row 2: a tie is wrong
    assert_close(ordered_pair_accuracy(scores, mask), torch.tensor([2 / 3, 0.0, 0.0]))
    differences, pairs = ordered_pairs(scores, mask)
    assert pairs.sum().item() == 5
    assert_close(differences.sum((-1, -2)), torch.tensor([2.0 + 1.0 - 1.0, -1.0, 0.0]))


def test_ordered_pairs_leave_out_the_pairs_the_data_ties() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    levels = torch.tensor([[0, 1, 1, 2], [0, 0, 1, 0]])
    # row 0 pairs: 3>1 ok, 3>2 ok, 3>0 ok, 1>0 ok, 2>0 ok (1 vs 2 tied: not a pair); row 1: 0>0 wrong, 1>0 ok
    assert_close(ordered_pair_accuracy(scores, mask, levels), torch.tensor([1.0, 0.5]))
    differences, pairs = ordered_pairs(scores, mask, levels)
    assert pairs.sum((-1, -2)).tolist() == [5, 2]
    assert_close(differences.sum((-1, -2)), torch.tensor([2.0 + 1.0 + 3.0 + 1.0 + 2.0, 0.0 + 1.0]))


def _rows(*scores: list[float], levels: dict[int, list[int]] | None = None) -> list[ScoredComparison]:
    levels = levels or {}
    return [ScoredComparison(torch.tensor(s), torch.tensor(levels.get(i, list(range(len(s))))))
            for i, s in enumerate(scores)]


def test_comparison_metrics_with_ties_by_hand() -> None:
    rows = _rows([2.0, 3.0, 0.0], [1.0, 0.5], levels={0: [0, 0, 1]})
    metrics = comparison_metrics(rows)
    # row 0: 2>0 ok, 3>0 ok (2 vs 3 tied first); row 1: 1>0.5 ok; margins 2, 3, 0.5
    assert metrics["eval_accuracy"] == pytest.approx(1.0)
    assert metrics["eval_margin"] == pytest.approx(5.5 / 3)
    assert metrics["eval_chosen_mean"] == pytest.approx((2 + 3 + 1) / 3)  # every response tied for first
    assert metrics["eval_rejected_mean"] == pytest.approx(0.5 / 2)


def test_comparison_metrics_by_hand() -> None:
    rows = _rows([2.0, 0.0], [1.0, 3.0], [4.0, 1.0, 2.0])
    metrics = comparison_metrics(rows)
    # ordered pairs: 2-0, 1-3, 4-1, 4-2, 1-2 -> accuracy per row 1, 0, 2/3; margins 2, -2, 3, 2, -1
    assert metrics["eval_accuracy"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert metrics["eval_margin"] == pytest.approx(4 / 5)
    assert metrics["eval_chosen_mean"] == pytest.approx(7 / 3)
    assert metrics["eval_rejected_mean"] == pytest.approx(6 / 4)


def test_first_error_by_hand() -> None:
    good = torch.tensor([[True, False, False], [True, True, True], [False, True, True], [True, True, False]])
    mask = torch.tensor([[True, True, True], [True, True, True], [True, True, False], [True, True, False]])
    assert first_bad(good, mask).tolist() == [1, 3, 0, 2]  # no error: the step count
    assert good_steps(torch.tensor([-0.1, 0.1]), "classification").tolist() == [False, True]
    assert good_steps(torch.tensor([0.4, 0.6]), "regression").tolist() == [False, True]


def test_the_reward_histogram_leaves_out_rewards_that_are_not_finite_and_says_how_many(tmp_path, monkeypatch):
    """A diverged reward model scores NaN; the report's histogram of the other rewards is still drawn (binning a
    NaN raised "autodetected range of [nan, nan] is not finite" and lost the report). A title with a data path's
    "$" in it is text, not math for matplotlib to parse (and fail on: "$a_$b.jsonl")."""
    from matplotlib.figure import Figure

    from posttrain.eval.rewards import plot_reward_distribution

    titles = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda fig, *a, **k: titles.append(fig.axes[0].get_title()) or save(fig, *a, **k))
    rows = _rows([1.0, 0.5, float("nan")], [float("nan"), 0.2, float("inf")])
    out = plot_reward_distribution(rows, tmp_path / "hist.png", "held-out rewards")
    plot_reward_distribution(_rows([1.0, 0.5]), tmp_path / "ok.png", "held-out rewards of data/$a_$b.jsonl")
    assert out.stat().st_size > 0 and (tmp_path / "ok.png").stat().st_size > 0
    assert titles == ["held-out rewards (3 not finite, left out)", "held-out rewards of data/$a_$b.jsonl"]


def test_soft_labelled_pairs_count_the_share_of_annotators_who_agree() -> None:
    """A pair whose annotators mostly preferred the `rejected` response (p = 0.1) is ordered right when rejected
    outscores chosen: it counted as wrong before, so a model that agreed with the labels scored 0.5."""
    from posttrain.train.comparisons import comparison_accuracy

    scores = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 1.0], [5.0, 4.0]])
    probs = torch.tensor([0.9, 0.1, 0.7, 0.5])
    levels = torch.tensor([[0, 1]] * 4)
    mask = torch.ones(4, 2, dtype=torch.bool)
    assert_close(comparison_accuracy(scores, mask, levels, probs), torch.tensor([0.9, 0.9, 0.0, 0.5]))
    assert_close(comparison_accuracy(scores, mask, levels, torch.ones(4)),
                 ordered_pair_accuracy(scores, mask, levels))  # hard labels: the plain accuracy
    rows = [ScoredComparison(s, torch.tensor([0, 1]), p) for s, p in zip(scores, probs.tolist(), strict=True)]
    assert comparison_metrics(rows)["eval_accuracy"] == pytest.approx((0.9 + 0.9 + 0.0 + 0.5) / 4)
    one = comparison_metrics(rows[:1])
    assert one["eval_chosen_std"] == 0 and one["eval_rejected_std"] == 0  # one comparison: not NaN
