"""Reward shaping of the RL stages: where a completion's score lands, the KL penalty in the reward, the
missing-EOS penalty, and the statistics that judge a critic and a group baseline.

The score of a completion is a reward for its last real token; every other token of the completion gets
only the per-token penalty -beta * KL_t when the KL is placed in the reward (Ziegler et al. 2019, the
RLHF reward of InstructGPT). The last token is read from the mask, never from token ids, so a pad that
equals EOS cannot move it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from posttrain.algos.logprobs import masked_var


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last 1 of each row of `mask`, [B], whatever side the padding is on (0 for an empty row).

    Shapes: mask [B, T] (0/1, bool or float) -> [B] long.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask.bool()).argmax(-1)


def score_at_last_token(scores: Tensor, mask: Tensor) -> Tensor:
    """Each row's score at its last real token (the last 1 of `mask`), 0 elsewhere.

    out[b, t] = scores[b] if t = last_token_index(mask)[b] and mask[b, t] = 1, else 0

    Shapes: scores [B], mask [B, T] -> [B, T] in the dtype of `scores`.
    """
    out = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rows = torch.arange(mask.shape[0], device=mask.device)
    out[rows, last_token_index(mask)] = scores
    return out * mask.to(scores.dtype)


def token_rewards(scores: Tensor, mask: Tensor, kl: Tensor | None = None, beta: float = 0.0) -> Tensor:
    """Per-token rewards of a completion: its score at the last real token, minus the KL penalty on every token.

    r_t = -beta * KL_t + [t = last real token] * score          (KL None: the score alone)

    The per-sequence sum of r_t is score - beta * sum_t KL_t, the KL-regularised return of RLHF.

    Shapes: scores [B]; mask, kl [B, T] -> [B, T] in the dtype of `scores`, 0 where the mask is 0.
    Source: Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences", eq. 2;
    Ouyang et al. (2022), "Training language models to follow instructions", eq. 2.
    """
    rewards = score_at_last_token(scores, mask)
    if kl is None:
        return rewards
    return rewards - beta * kl.to(scores.dtype) * mask.to(scores.dtype)


def missing_eos_penalty(scores: Tensor, truncated: Tensor, penalty: float | None) -> Tensor:
    """Scores of completions cut by the length limit lowered by `penalty` (None: unchanged).

    score'_i = score_i - penalty * [completion i has no EOS]

    Shapes: scores [B], truncated [B] bool -> [B].
    Source: the missing-EOS penalty of TRL's PPO/RLOO trainers (a fixed penalty for unfinished answers).
    """
    if penalty is None:
        return scores
    return scores - penalty * truncated.to(scores.dtype)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """How much of the returns' variance the critic predicts, over the tokens where `mask` is 1.

    EV = 1 - Var(R - V) / Var(R)       1: V predicts R; 0: no better than a constant; < 0: worse

    Shapes: values, returns, mask [B, T] -> float (NaN when the returns do not vary).
    """
    variance = masked_var(returns, mask).item()
    return 1.0 - masked_var(returns - values, mask).item() / variance if variance > 0 else float("nan")


def zero_advantage_groups(advantages: Tensor, group_ids: Tensor) -> Tensor:
    """True for every completion of a group in which all advantages are exactly 0 (e.g. equal rewards under
    a group baseline): such a group adds no policy gradient, only tokens to the normaliser.

    Shapes: advantages [B, T], group_ids [B] -> [B] bool.
    Source: DAPO's dynamic sampling (Yu et al. 2025, §3.2) drops the groups whose accuracy is 0 or 1.
    """
    nonzero = (advantages != 0).any(dim=1)
    _, index = torch.unique(group_ids, return_inverse=True)
    counts = torch.zeros(int(index.max()) + 1 if len(index) else 0, dtype=torch.long, device=nonzero.device)
    counts.index_add_(0, index, nonzero.long())
    return counts[index] == 0


class GroupBand(NamedTuple):
    """Per distinct group (ascending ids): `keep` = spread and distance 0."""

    groups: Tensor
    keep: Tensor
    spread: Tensor
    """Whether the group's scores are not all equal (a group baseline gives it a gradient)."""
    distance: Tensor
    """How far the group's mean score lies outside [low, high] (0 inside)."""


def group_success_band(scores: Tensor, group_ids: Tensor, low: float, high: float) -> GroupBand:
    """Which groups of completions are informative for a group baseline: their scores are not all equal and
    their mean score lies in [low, high] (for 0/1 rewards, the group's success rate p).

    Shapes: scores [B], group_ids [B] -> [K] per distinct group.
    Source: the expected policy improvement of a group baseline is bounded below by p(1 - p) (Bae et al. 2025,
    "Online Difficulty Filtering for Reasoning Oriented RL"); DAPO's dynamic sampling (Yu et al. 2025, §3.2)
    is the band [0, 1] with spread required, i.e. 0 < p < 1.
    """
    groups, index = torch.unique(group_ids, return_inverse=True)
    scores = scores.double()
    empty = torch.zeros(len(groups), dtype=torch.float64)
    mean = empty.index_add(0, index, scores) / empty.index_add(0, index, torch.ones_like(scores))
    lowest = empty.scatter_reduce(0, index, scores, reduce="amin", include_self=False)
    highest = empty.scatter_reduce(0, index, scores, reduce="amax", include_self=False)
    distance = (low - mean).clamp(min=0) + (mean - high).clamp(min=0)
    spread = highest > lowest
    return GroupBand(groups=groups, keep=spread & (distance == 0), spread=spread, distance=distance)


def best_worst_pairs(scores: Tensor, group_ids: Tensor, min_margin: float = 0.0) -> list[tuple[int, int]]:
    """One preference pair per group of completions of a prompt: (row of its best-scored completion, row of its
    worst), for every group whose best beats its worst by more than `min_margin`; ties go to the first row (the
    samples of a group are exchangeable, so that is a random pick). Groups in order of first appearance.

    Shapes: scores [B], group_ids [B] -> [(chosen row, rejected row)].
    Source: on-policy pairs of iterative DPO / RPO (Pang et al. 2024, "Iterative Reasoning Preference
    Optimization": a correct and an incorrect sample of the same prompt; Xiong et al. 2024: best and worst of
    n under a reward model).
    """
    rows: dict[int, list[int]] = {}
    for row, group in enumerate(group_ids.tolist()):
        rows.setdefault(group, []).append(row)
    pairs = []
    for members in rows.values():
        values = scores[members].double()
        best, worst = members[int(torch.argmax(values))], members[int(torch.argmin(values))]
        if float(scores[best]) - float(scores[worst]) > min_margin:
            pairs.append((best, worst))
    return pairs
