"""Advantage estimators: GAE for PPO, group baselines for GRPO / RLOO / REINFORCE, process supervision.

Advantages are constants of the policy-gradient surrogate, so every function here detaches its
inputs: no gradient flows into the value model or the rewards through an advantage.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

GROUP_SCALES = ("group", "batch", "none")


class Advantages(NamedTuple):
    """Token-level advantages and the regression targets of the value model.

    advantages: [B, T], 0 where ``response_mask`` is 0.
    returns:    [B, T], advantages + values for GAE (the value targets); critic-free estimators
                have no value model to regress and return the advantages themselves.
    """

    advantages: Tensor
    returns: Tensor


def gae(rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float) -> Advantages:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation", eq. 16).

    delta_t = r_t + gamma * V_{t+1} - V_t ;  A_t = sum_l (gamma * lam)^l * delta_{t+l} ;  R_t = A_t + V_t

    lam = 0 gives the one-step TD error delta_t; lam = 1 gives the Monte-Carlo return minus V_t,
    sum_l gamma^l r_{t+l} - V_t (the lecture notes this project started from have the two swapped).

    Only positions with ``response_mask`` = 1 take part: masked positions (prompt, padding, tool
    output between turns) are skipped, "t+1" is the next unmasked position, and the value after the
    last unmasked position is 0 (the episode ends at EOS; nothing is bootstrapped from padding). A completion cut
    at the length limit, with no EOS, is ended there too: its last value is not bootstrapped either (as in TRL's
    PPO; the reward at its last token is the whole return).

    Shapes: rewards, values, response_mask [B, T] -> Advantages of [B, T] tensors, 0 where masked.
    """
    rewards, values = rewards.detach(), values.detach()
    keep = response_mask.bool()
    zeros = torch.zeros_like(values[:, 0])
    next_value, next_advantage = zeros, zeros
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # Carrying the previous state through masked positions is what "skip them" means.
        next_advantage = torch.where(keep[:, t], advantage, next_advantage)
        next_value = torch.where(keep[:, t], values[:, t], next_value)
        advantages[:, t] = torch.where(keep[:, t], advantage, zeros)
    returns = torch.where(keep, advantages + values, torch.zeros_like(values))
    return Advantages(advantages=advantages, returns=returns)


def _float_dtype(rewards: Tensor) -> torch.dtype:
    return rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()


def _centre_by_group(values: Tensor, group_index: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Float64 ``values - mean(group)`` with exact zeros for constant groups, and the group sizes.

    The mean of eight copies of 0.1 is not exactly 0.1 in floating point, so a constant group
    would otherwise get advantages of ~1e-9 (and, divided by std + eps, of arbitrary size): a
    group with max == min is set to exactly 0 instead.
    """
    values = values.detach().to(torch.float64)
    counts = torch.zeros(num_groups, dtype=torch.float64, device=values.device)
    counts.index_add_(0, group_index, torch.ones_like(values))
    sums = torch.zeros_like(counts).index_add_(0, group_index, values)
    highs = torch.full_like(counts, -torch.inf).scatter_reduce(0, group_index, values, "amax")
    lows = torch.full_like(counts, torch.inf).scatter_reduce(0, group_index, values, "amin")
    centred = values - (sums / counts)[group_index]
    centred = torch.where((highs == lows)[group_index], torch.zeros_like(centred), centred)
    return centred, counts


def _group_std(centred: Tensor, group_index: Tensor, counts: Tensor, unbiased: bool) -> Tensor:
    """Per-group standard deviation from centred values; 0 for groups too small to have one."""
    squares = torch.zeros_like(counts).index_add_(0, group_index, centred.square())
    dof = counts - 1 if unbiased else counts
    return torch.where(dof > 0, squares / dof.clamp(min=1), torch.zeros_like(squares)).sqrt()


def _scale(centred: Tensor, std: Tensor, eps: float) -> Tensor:
    """centred / (std + eps), with 0 where std + eps is 0 (centred is then exactly 0 too: eps=0 is allowed)."""
    divisor = std + eps
    return torch.where(divisor > 0, centred / torch.where(divisor > 0, divisor, 1.0), 0.0)


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary prompt ids [N] (or rows of ids [N, k], a group per distinct row) to 0..G-1; completions of one
    prompt may sit anywhere in the batch."""
    unique, index = torch.unique(group_ids, dim=0, return_inverse=True)
    return index, unique.numel()


def group_advantages(
    rewards: Tensor, group_ids: Tensor, scale: str = "group", eps: float = 1e-6, unbiased: bool = True
) -> Tensor:
    """Outcome advantages with the group mean as baseline (GRPO).

    A_i = (r_i - mean_{g(i)}) / (std + eps), where g(i) is the group of completions that share
    completion i's prompt id and ``scale`` picks std:
        "group": std of the rewards of group g(i)       (GRPO, Shao et al. 2024, eq. 3 / §4.1.2)
        "batch": std of all rewards in the batch         (Liu et al. 2025, "Tricks or Traps", Lite PPO)
        "none":  no division, A_i = r_i - mean_{g(i)}   (Dr. GRPO, Liu et al. 2025)
    std is the unbiased (Bessel-corrected, n - 1) standard deviation, as ``torch.std`` and the
    TRL / verl GRPO implementations use; ``unbiased=False`` divides by n. A group of one has std 0.

    Groups are found by id, not by position. Every group's advantages sum to 0 (up to rounding)
    and a group whose rewards are all equal gets exactly 0 (computed in float64).

    Shapes: rewards [B] (one score per completion), group_ids [B] (int, e.g. prompt index) -> [B].
    """
    if scale not in GROUP_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; allowed: {', '.join(GROUP_SCALES)}")
    index, num_groups = _group_index(group_ids)
    centred, counts = _centre_by_group(rewards, index, num_groups)
    if scale == "group":
        centred = _scale(centred, _group_std(centred, index, counts, unbiased)[index], eps)
    elif scale == "batch":
        everything = torch.zeros_like(index)
        batch_centred, batch_count = _centre_by_group(rewards, everything, 1)
        centred = _scale(centred, _group_std(batch_centred, everything, batch_count, unbiased), eps)
    return centred.to(_float_dtype(rewards))


def rloo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """REINFORCE leave-one-out advantages: each completion's baseline is the mean of the others.

    A_i = r_i - mean_{j in g(i), j != i} r_j = G / (G - 1) * (r_i - mean_{g(i)})

    with G the size of completion i's group; a group of one has no baseline and gets 0.

    Shapes: rewards [B], group_ids [B] -> [B].
    Source: Kool et al. (2019), "Buy 4 REINFORCE Samples, Get a Baseline for Free!";
    Ahmadian et al. (2024), "Back to Basics: Revisiting REINFORCE Style Optimization" (RLOO).
    """
    index, num_groups = _group_index(group_ids)
    centred, counts = _centre_by_group(rewards, index, num_groups)
    size = counts[index]
    factor = torch.where(size > 1, size / (size - 1).clamp(min=1), torch.zeros_like(size))
    return (centred * factor).to(_float_dtype(rewards))


def reinforce_baseline(rewards: Tensor, baselines: Tensor | None = None) -> Tensor:
    """REINFORCE with a baseline: A_i = r_i - b_i.

    ``baselines`` [B] is any quantity that does not depend on completion i's own sample: e.g. the
    reward of the greedy completion of the same prompt (ReMax, Li et al. 2023) or a running mean.
    Without one, b is the batch mean of the rewards (exactly 0 advantages if all rewards are equal).

    Shapes: rewards [B], baselines [B] or None -> [B].
    Source: Williams (1992), "Simple Statistical Gradient-Following Algorithms" (reinforcement baseline b).
    """
    if baselines is None:
        single = torch.zeros(rewards.shape, dtype=torch.long, device=rewards.device)
        return _centre_by_group(rewards, single, 1)[0].to(_float_dtype(rewards))
    return (rewards.detach() - baselines.detach()).to(_float_dtype(rewards))


def broadcast_to_tokens(sequence_values: Tensor, response_mask: Tensor) -> Tensor:
    """Give every response token its sequence's value (outcome supervision), 0 elsewhere.

    A[b, t] = a[b] * response_mask[b, t]

    Shapes: sequence_values [B], response_mask [B, T] -> [B, T].
    Source: outcome supervision in GRPO (Shao et al. 2024, §4.1.2).
    """
    expanded = sequence_values.unsqueeze(-1).expand(response_mask.shape)
    return torch.where(response_mask.bool(), expanded, torch.zeros_like(expanded))


def process_advantages(
    step_rewards: Tensor,
    step_mask: Tensor,
    step_ends: Tensor,
    group_ids: Tensor,
    response_mask: Tensor,
    eps: float = 1e-6,
    unbiased: bool = True,
    gamma: float = 1.0,
    step_positions: Tensor | None = None,
) -> Tensor:
    """GRPO process-supervision advantages: normalised step rewards summed over later steps.

    r~_{i,j} = (r_{i,j} - mean(R_g)) / (std(R_g) + eps)    R_g = all step rewards of all completions
                                                           in completion i's group g
    or, given ``step_positions``, R_g is R_{g,p(i,j)}: the rewards of the steps at the same position (step j of
    a problem whose steps are fixed, the outcome as a position of its own) in the group's completions. A step
    is then compared only with the same step of the other completions: one that all of them got right (or all
    wrong) gets 0, and the credit goes to the steps where they differ (as does a step no other completion has at
    its position). Against the whole group's pool, every right early step is pushed up and every late one down,
    whatever the other completions did.
    A_{i,t}  = sum_{j : end(i, j) >= t} gamma^(k(j) - k(t)) r~_{i,j}

    k(j) counts the distinct step ends of completion i before step j's end, k(t) those before token t:
    a step's tokens get its own reward plus the later ones discounted by gamma per step. gamma = 1 is
    DeepSeekMath's sum over the steps ending at or after t; gamma = 0 gives every token only the reward
    of the step it belongs to (steps sharing an end token are summed), which is the credit to use when a
    step's label already says whether everything up to it is right (labels that stay wrong after the
    first mistake, as in Math-Shepherd): with gamma = 1 the right steps before a mistake are charged
    with every wrong step after it, and differ little from the mistake itself.

    Tokens after the last step's end get 0, as do tokens outside ``response_mask``. std is the
    unbiased one (``unbiased=False`` for n), as in ``group_advantages``; a group whose step rewards
    are all equal gets exactly 0.

    Shapes: step_rewards [B, S] (reward of step j of completion i, padded), step_mask [B, S]
    (1 = real step), step_ends [B, S] (int, token index in [0, T) of each step's last token, i.e.
    where a process reward model reads its score), group_ids [B], response_mask [B, T],
    step_positions [B, S] (int; equal values = the same step) -> [B, T].
    Source: Shao et al. (2024), "DeepSeekMath", §4.1.3.
    """
    real = step_mask.bool()
    time = response_mask.shape[1]
    ends = step_ends[real].long()
    if ends.numel() and (int(ends.min()) < 0 or int(ends.max()) >= time):
        raise ValueError(f"step_ends must lie in [0, {time}) on real steps, got [{int(ends.min())}, {int(ends.max())}]")
    rows = torch.arange(step_rewards.shape[0], device=step_rewards.device).unsqueeze(1).expand_as(step_rewards)
    rows = rows[real]
    step_index, num_groups = _group_index(group_ids)
    step_index = step_index[rows]
    if step_positions is not None:  # one baseline per (group, position): pairs made into one id
        step_index, num_groups = _group_index(torch.stack([step_index, step_positions[real].long()], dim=-1))
    centred, counts = _centre_by_group(step_rewards[real], step_index, num_groups)
    normalised = _scale(centred, _group_std(centred, step_index, counts, unbiased)[step_index], eps)
    at_ends = torch.zeros(response_mask.shape, dtype=torch.float64, device=step_rewards.device)
    at_ends.index_put_((rows, ends), normalised, accumulate=True)
    if gamma == 1.0:
        # A reversed cumulative sum turns "reward placed at each step's end" into "sum over steps
        # ending at or after t".
        to_go = at_ends.flip(-1).cumsum(-1).flip(-1)
    else:
        is_end = torch.zeros(response_mask.shape, dtype=torch.bool, device=step_rewards.device)
        is_end[rows, ends] = True
        to_go = torch.zeros_like(at_ends)
        running = torch.zeros_like(at_ends[:, 0])
        for t in range(time - 1, -1, -1):  # discounted once per step end passed, not per token
            running = torch.where(is_end[:, t], at_ends[:, t] + gamma * running, running)
            to_go[:, t] = running
    to_go = torch.where(response_mask.bool(), to_go, torch.zeros_like(to_go))
    return to_go.to(_float_dtype(step_rewards))
