"""Losses of every post-training stage, as functions of logprobs, rewards and values.

SFT, rejection sampling, offline RFT and DPO are all weighted-likelihood objectives: ``sft_loss``
with per-sequence ``weights`` of 1 (SFT), 0/1 from a grader (rejection sampling) or partial credit
(offline RFT); DPO reweights the likelihood of chosen against rejected through the reference.
The RL losses (``policy_loss``, ``value_loss``, ``grpo_loss``) produce [B, T] per-token terms that
``aggregate`` reduces in one of the named modes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.algos.kl import kl_penalty
from posttrain.algos.logprobs import masked_mean, masked_sum

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
DPO_KINDS = ("sigmoid", "ipo", "hinge", "robust")
PROCESS_TARGETS = ("classification", "regression")


class PolicyLossOutput(NamedTuple):
    """loss: scalar to backpropagate; clip_fraction: share of response tokens whose clipped
    term is the active one; approx_kl: k3 estimate of KL(pi_old || pi) over response tokens.
    The two statistics are detached 0-dim tensors."""

    loss: Tensor
    clip_fraction: Tensor
    approx_kl: Tensor


class ValueLossOutput(NamedTuple):
    """loss: scalar; clip_fraction: share of response tokens where the clipped error is larger (detached)."""

    loss: Tensor
    clip_fraction: Tensor


class DPOOutput(NamedTuple):
    """loss: scalar; chosen_rewards / rejected_rewards: the implicit rewards
    beta * (logp - ref_logp), [B], detached."""

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


class ListwiseDPOOutput(NamedTuple):
    """loss: scalar; rewards: the implicit rewards beta * (logp - ref_logp) of every ranked response,
    [B, K] best first (0 where absent), detached."""

    loss: Tensor
    rewards: Tensor


class KTOOutput(NamedTuple):
    """loss: scalar; rewards: the implicit rewards beta * (logp - ref_logp) of every row, [B], detached;
    kl: the reference point z0 (a detached 0-dim tensor)."""

    loss: Tensor
    rewards: Tensor
    kl: Tensor


class GRPOLossOutput(NamedTuple):
    """loss = pg_loss + beta * aggregated KL; kl: mean per-token KL to the reference (detached)."""

    loss: Tensor
    pg_loss: Tensor
    kl: Tensor
    clip_fraction: Tensor
    approx_kl: Tensor


def aggregate(
    loss: Tensor,
    response_mask: Tensor,
    mode: str = "token-mean",
    normaliser: float | Tensor | None = None,
    max_length: int | None = None,
) -> Tensor:
    """Reduce per-token losses [B, T] to a scalar.

    With m = response_mask, L = loss, N = ``normaliser``:
        "token-mean":              sum_{b,t} m L / N,  N defaults to sum_{b,t} m
        "seq-mean-token-mean":     sum_b (sum_t m L / sum_t m) / N,  N defaults to B
        "seq-mean-token-sum":      sum_b (sum_t m L) / N,  N defaults to B
        "seq-mean-token-sum-norm": sum_b (sum_t m L) / (N * max_length),  N defaults to B

    For gradient accumulation pass N over the whole accumulated batch (its token count for
    token-mean, its sequence count otherwise): the micro-batch losses then sum to the full-batch
    loss, and a long completion in a short micro-batch is not up-weighted. ``max_length`` is the
    Dr. GRPO constant (the configured maximum response length; defaults to T, which varies with
    padding, so pass it). Sequences with an empty mask count in the default N of the seq modes.

    Shapes: loss, response_mask [B, T] -> scalar.
    Source: token-mean is DAPO (Yu et al. 2025, §3.3 "Token-Level Policy Gradient Loss");
    seq-mean-token-mean is GRPO (Shao et al. 2024, eq. 3); seq-mean-token-sum-norm is Dr. GRPO
    (Liu et al. 2025, "Understanding R1-Zero-Like Training"); the mode names are verl's.
    """
    if mode == "token-mean":
        return masked_mean(loss, response_mask, normaliser=normaliser)
    sequences = normaliser if normaliser is not None else loss.shape[0]
    if mode == "seq-mean-token-mean":
        return masked_mean(loss, response_mask, dim=-1).sum() / sequences
    if mode == "seq-mean-token-sum":
        return masked_sum(loss, response_mask) / sequences
    if mode == "seq-mean-token-sum-norm":
        length = max_length if max_length is not None else loss.shape[-1]
        return masked_sum(loss, response_mask) / (sequences * length)
    raise ValueError(f"unknown loss aggregation {mode!r}; allowed: {', '.join(AGG_MODES)}")


def sft_loss(
    logprobs: Tensor,
    response_mask: Tensor,
    normaliser: float | Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """(Weighted) negative log-likelihood of the response tokens, normalised by a token count.

    loss = -sum_{b,t} w_b * m_{b,t} * logprobs_{b,t} / N

    N = ``normaliser`` (the answer-token count of the whole accumulated batch) or sum(m). The
    prompt is masked out of m; the EOS token is part of the answer and stays in. ``weights`` [B]
    makes the likelihood family explicit: all 1 is SFT, 0/1 from a grader is rejection sampling,
    partial credit in [0, 1] is offline RFT; None means all 1.

    Shapes: logprobs, response_mask [B, T], weights [B] -> scalar.
    Source: maximum likelihood on demonstrations (Ouyang et al. 2022, §3.5 "SFT"); weighted
    variants: reward-weighted regression (Peters & Schaal 2007), rejection sampling (Touvron et al.
    2023, "Llama 2", §3.2.3).
    """
    nll = -logprobs
    if weights is not None:
        nll = nll * weights.unsqueeze(-1)
    return masked_mean(nll, response_mask, normaliser=normaliser)


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | float | None = None,
    preference_probs: Tensor | None = None,
) -> Tensor:
    """Pairwise reward-model loss, mean over pairs.

    d = r_chosen - r_rejected - margin
    hard labels:  loss = -log sigmoid(d)
    soft labels:  loss = -(p log sigmoid(d) + (1 - p) log sigmoid(-d)) = BCE(sigmoid(d), p)

    with p = ``preference_probs``, the probability that "chosen" is preferred (p = 1 is the hard
    case). ``margin`` (scalar or [B]) demands a gap proportional to the annotators' confidence.

    Shapes: chosen_rewards, rejected_rewards [B], margin [B] or scalar, preference_probs [B] -> scalar.
    Source: Bradley & Terry (1952); Ouyang et al. (2022), eq. 1; margin: Touvron et al. (2023),
    "Llama 2", eq. 2; soft labels: Christiano et al. (2017), §2.2.3.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    if preference_probs is None:
        return -F.logsigmoid(diff).mean()
    return F.binary_cross_entropy_with_logits(diff, preference_probs.to(diff.dtype))


def plackett_luce_loss(scores: Tensor, mask: Tensor | None = None, levels: Tensor | None = None) -> Tensor:
    """Negative log-likelihood of a ranking under the Plackett–Luce model, mean over rankings.

    P(ranking) = prod_k exp(s_k) / sum_{j >= k} exp(s_j)   (items listed best first)
    loss = -sum_k [s_k - logsumexp_{j >= k} s_j]

    ``mask`` [B, K] marks the items present (ragged K: rankings of different lengths); absent
    items are left out of every sum, so the remaining items keep their order. K = 2 is the
    Bradley–Terry loss.

    ``levels`` [B, K] (0 = best, non-decreasing along a row) states ties: items of one level are
    tied. Ties take Breslow's approximation, as in Cox regression with tied event times: each item
    of a tied group is chosen from everything at its level or below, its tied partners included,
    loss = -sum_k [s_k - logsumexp_{j: level_j >= level_k} s_j]. Without ties (levels = positions)
    it is the formula above; a tied group's terms are largest when its scores are equal.

    Shapes: scores [B, K] (best first), mask [B, K] or None, levels [B, K] or None -> scalar.
    Source: Plackett (1975), Luce (1959); for reward models, Zhu et al. (2023), "Principled RLHF
    from Pairwise or K-wise Comparisons"; ties: Breslow (1974), "Covariance Analysis of Censored
    Survival Data".
    """
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    present = mask.bool()
    if levels is None:
        levels = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)
    # candidates[b, k, j]: item j is still in the running when item k is chosen.
    candidates = (levels.unsqueeze(-2) >= levels.unsqueeze(-1)) & present.unsqueeze(-2)
    # A finite floor instead of -inf: logsumexp's backward is exp(s - lse), NaN for a row that is all
    # -inf (an absent item after the last present one has no candidates).
    floor = torch.finfo(scores.dtype).min
    pool_lse = scores.unsqueeze(-2).masked_fill(~candidates, floor).logsumexp(-1)
    terms = torch.where(present, scores - pool_lse, torch.zeros_like(scores))
    return -terms.sum(-1).mean()


def soft_label_flip(preference_prob: Tensor, label_smoothing: float) -> Tensor:
    """The probability that a pair's label is wrong, for `dpo_loss`'s per-pair label_smoothing: a soft label p (the
    share of annotators who prefer the chosen answer) flips with 1 - p, and label smoothing e flips what is left, so
    the chosen answer is truly preferred with p (1 - e) + (1 - p) e. Shapes: [B] -> [B]."""
    return (1 - preference_prob) * (1 - label_smoothing) + preference_prob * label_smoothing


def dpo_loss(
    chosen_logprobs: Tensor,
    rejected_logprobs: Tensor,
    ref_chosen_logprobs: Tensor,
    ref_rejected_logprobs: Tensor,
    beta: float = 0.1,
    kind: str = "sigmoid",
    label_smoothing: float | Tensor = 0.0,
) -> DPOOutput:
    """Direct preference optimisation and its variants, mean over pairs.

    h = (logp_c - ref_c) - (logp_r - ref_r),  e = label_smoothing (probability a label is flipped; for "sigmoid"
        one per pair [B] too: a soft label p, the share of annotators who prefer the chosen answer, is e = 1 - p)
        "sigmoid": -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)        (DPO; cDPO for e > 0)
        "robust":  (-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e)   (rDPO)
        "hinge":   max(0, 1 - beta h)                                            (SLiC-HF)
        "ipo":     (h - 1 / (2 beta))^2                                          (IPO)
    implicit rewards: chosen_rewards = beta (logp_c - ref_c), rejected_rewards = beta (logp_r - ref_r).

    The logprobs are sequence totals over the answer tokens (the reference ones can be computed
    once, before training). The IPO paper uses per-token averages: pass those for "ipo".

    Shapes: the four logprobs [B] -> DPOOutput(loss scalar, chosen_rewards [B], rejected_rewards [B]).
    Source: Rafailov et al. (2023), eq. 7; cDPO: Mitchell (2023); rDPO: Chowdhury et al. (2024),
    "Provably Robust DPO"; SLiC-HF: Zhao et al. (2023), hinge as in TRL; IPO: Azar et al. (2023),
    "A General Theoretical Paradigm to Understand Learning from Human Preferences".
    """
    chosen_ratio = chosen_logprobs - ref_chosen_logprobs
    rejected_ratio = rejected_logprobs - ref_rejected_logprobs
    h = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) / (
            1 - 2 * label_smoothing
        )
    elif kind == "hinge":
        losses = torch.relu(1 - beta * h)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)).square()
    else:
        raise ValueError(f"unknown DPO loss {kind!r}; allowed: {', '.join(DPO_KINDS)}")
    return DPOOutput(
        loss=losses.mean(),
        chosen_rewards=(beta * chosen_ratio).detach(),
        rejected_rewards=(beta * rejected_ratio).detach(),
    )


def dpo_plackett_luce_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor | None = None,
    beta: float = 0.1,
    levels: Tensor | None = None,
) -> ListwiseDPOOutput:
    """DPO for rankings of K >= 2 responses: the Plackett–Luce likelihood of the ranking under the
    implicit rewards, mean over rankings.

    r_k  = beta * (logp_k - ref_k)                       (implicit reward of the k-th best response)
    loss = -sum_k [r_k - logsumexp_{j >= k} r_j]          (= plackett_luce_loss(r, mask))

    At K = 2 this is -log sigmoid(r_1 - r_2): the pairwise sigmoid DPO loss. ``mask`` [B, K] marks
    the responses present (rankings of different lengths); an absent response is left out of every
    sum; ``levels`` [B, K] states tied responses, as for ``plackett_luce_loss``. Sequence logprobs are totals
    over answer tokens, as for ``dpo_loss``.

    Shapes: logprobs, ref_logprobs [B, K] (best first), mask, levels [B, K] or None -> ListwiseDPOOutput.
    Source: Rafailov et al. (2023), "Direct Preference Optimization", appendix A.3 (the
    Plackett–Luce generalisation of the DPO objective).
    """
    rewards = beta * (logprobs - ref_logprobs)
    if mask is not None:
        rewards = rewards.masked_fill(~mask.bool(), 0.0)
    return ListwiseDPOOutput(loss=plackett_luce_loss(rewards, mask, levels), rewards=rewards.detach())


def kto_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    kl_logprobs: Tensor,
    ref_kl_logprobs: Tensor,
    desirable: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOOutput:
    """Kahneman–Tversky optimisation: learn from completions labelled desirable or undesirable, one at a time.

    r_b  = logp_b - ref_b                                   (implied reward, sequence logprobs of the answer)
    z0   = max(0, mean_b (kl_logp_b - ref_kl_b)), detached   (reference point: the batch's KL estimate)
    loss_b = lambda_D (1 - sigmoid(beta (r_b - z0)))   for a desirable row
             lambda_U (1 - sigmoid(beta (z0 - r_b)))   for an undesirable row
    loss = mean_b loss_b

    kl_logp / ref_kl are the policy's and the reference's logprobs of mismatched pairs (a prompt with another
    row's completion): their mean log-ratio estimates KL(pi || ref), the "status quo" a completion is judged
    against. It is detached (no gradient flows through the reference point) and clamped at 0 as in the paper's
    estimate. Implicit rewards are reported as beta * r_b, as DPO's are.

    Shapes: logprobs, ref_logprobs, desirable (bool) [B]; kl_logprobs, ref_kl_logprobs [M] (M = B for one pair
    per row) -> KTOOutput(loss scalar, rewards [B], kl scalar).
    Source: Ethayarajh et al. (2024), "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 7-8 and the
    z0 estimate of §4.1; the per-row weighting and mean as in TRL's KTOTrainer.
    """
    ratio = logprobs - ref_logprobs
    kl = (kl_logprobs - ref_kl_logprobs).mean().detach().clamp(min=0)
    desirable = desirable.bool()
    value = torch.where(desirable, torch.sigmoid(beta * (ratio - kl)), torch.sigmoid(beta * (kl - ratio)))
    weights = torch.where(desirable, value.new_tensor(desirable_weight), value.new_tensor(undesirable_weight))
    return KTOOutput(loss=(weights * (1 - value)).mean(), rewards=(beta * ratio).detach(), kl=kl)


def reward_centering_penalty(rewards: Tensor, mask: Tensor | None = None) -> Tensor:
    """Auxiliary loss that keeps a reward model's scores centred on zero, mean over comparisons.

    penalty = mean_b (sum_k m_{b,k} r_{b,k})^2        (pairs: (r_chosen + r_rejected)^2)

    The Bradley–Terry and Plackett–Luce losses only see reward differences, so any constant can
    drift into the scores; this pins the free constant without touching the differences'
    gradient direction. Add it times a small coefficient (e.g. 0.01) to the ranking loss.

    Shapes: rewards [B, K], mask [B, K] or None -> scalar.
    Source: Eisenstein et al. (2023), "Helping or Herding? Reward Model Ensembles Mitigate but do
    not Eliminate Reward Hacking" (as TRL's center_rewards_coefficient).
    """
    if mask is not None:
        rewards = rewards * mask.to(rewards.dtype)
    return rewards.sum(-1).square().mean()


def process_reward_loss(
    scores: Tensor,
    labels: Tensor,
    step_mask: Tensor,
    kind: str = "classification",
    normaliser: float | Tensor | None = None,
) -> Tensor:
    """Per-step loss of a process reward model, summed over labelled steps and divided by N.

    "classification": L_s = BCE(sigmoid(scores_s), labels_s)  (labels in [0, 1]; soft labels allowed)
    "regression":     L_s = (scores_s - labels_s)^2
    loss = sum_{b,s} step_mask * L / N,  N = ``normaliser`` (labelled steps of the whole accumulated
    batch) or sum(step_mask).

    The score of step s is read at the token that ends it (its separator), so one forward scores
    every step of a solution.

    Shapes: scores, labels, step_mask [B, S] -> scalar.
    Source: Lightman et al. (2023), "Let's Verify Step by Step" (per-step correctness read at
    each step's last token); soft step labels (the share of continuations from a step that reach
    the right answer): Wang et al. (2023), "Math-Shepherd".
    """
    if kind == "classification":
        per_step = F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype), reduction="none")
    elif kind == "regression":
        per_step = (scores - labels.to(scores.dtype)).square()
    else:
        raise ValueError(f"unknown process reward target {kind!r}; allowed: {', '.join(PROCESS_TARGETS)}")
    return masked_mean(per_step, step_mask, normaliser=normaliser)


def _clipped_surrogate(
    ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float | None, dual_clip: float | None
) -> tuple[Tensor, Tensor]:
    """Per-token PPO surrogate loss and the indicator of tokens whose clipped term is active."""
    clip_high = clip_low if clip_high is None else clip_high
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        # With A < 0 and a huge ratio the surrogate is unbounded; dual clip caps it at -c A.
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    return loss, clipped > unclipped


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    normaliser: float | Tensor | None = None,
    max_length: int | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate, with decoupled clip range and optional dual clip.

    ratio_t = exp(logprobs_t - old_logprobs_t)          (pi / pi_old; not the other way round)
    L_t     = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - clip_low, 1 + clip_high))
    dual clip (c = ``dual_clip`` > 1): L_t = min(L_t, -c A_t) where A_t < 0
    loss    = aggregate(L, response_mask, agg, normaliser, max_length)

    clip_high defaults to clip_low (symmetric PPO); a larger clip_high is DAPO's "clip-higher".
    At ratio 1 (first update on fresh samples) the loss is -mean(A), clip fraction 0, approx KL 0.

    Shapes: logprobs, old_logprobs, advantages, response_mask [B, T] -> PolicyLossOutput.
    Source: Schulman et al. (2017), "PPO", eq. 7; dual clip: Ye et al. (2020), "Mastering Complex
    Control in MOBA Games with Deep Reinforcement Learning"; clip-higher: Yu et al. (2025), "DAPO", §3.1.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    return _surrogate_output(ratio, logprobs, old_logprobs, advantages, response_mask, clip_low, clip_high,
                             dual_clip, agg, normaliser, max_length)


def gspo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float | None = 4e-4,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    normaliser: float | Tensor | None = None,
    max_length: int | None = None,
) -> PolicyLossOutput:
    """GSPO: the PPO surrogate with a sequence-level, length-normalised importance ratio.

    s_i     = exp( mean_{t in y_i} (logprobs_{i,t} - old_logprobs_{i,t}) )
    s_{i,t} = sg[s_i] * exp(logprobs_{i,t} - sg[logprobs_{i,t}])     (value s_i, gradient of logp_t)
    L_{i,t} = max(-A_{i,t} s_{i,t}, -A_{i,t} clip(s_{i,t}, 1 - clip_low, 1 + clip_high))  (+ dual clip)

    Whole sequences are clipped or not, so the clip ranges are ~1e-3, not 0.2 (the defaults are
    the paper's). The paper aggregates with "seq-mean-token-mean".

    Shapes: as ``policy_loss``.
    Source: Zheng et al. (2025), "Group Sequence Policy Optimization" (GSPO and GSPO-token).
    """
    log_ratio = logprobs - old_logprobs
    sequence_log_ratio = masked_mean(log_ratio, response_mask, dim=-1)
    ratio = torch.exp(sequence_log_ratio.detach().unsqueeze(-1) + logprobs - logprobs.detach())
    return _surrogate_output(ratio, logprobs, old_logprobs, advantages, response_mask, clip_low, clip_high,
                             dual_clip, agg, normaliser, max_length)


def _surrogate_output(ratio: Tensor, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
                      response_mask: Tensor, clip_low: float, clip_high: float | None, dual_clip: float | None,
                      agg: str, normaliser: float | Tensor | None, max_length: int | None) -> PolicyLossOutput:
    """The clipped surrogate of a given ratio, aggregated, with its clip fraction and k3 approx KL."""
    per_token, clipped = _clipped_surrogate(ratio, advantages, clip_low, clip_high, dual_clip)
    return PolicyLossOutput(
        loss=aggregate(per_token, response_mask, agg, normaliser, max_length),
        clip_fraction=masked_mean(clipped.to(ratio.dtype), response_mask).detach(),
        approx_kl=masked_mean(kl_penalty(old_logprobs, logprobs, "k3"), response_mask).detach(),
    )


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    normaliser: float | Tensor | None = None,
    max_length: int | None = None,
) -> ValueLossOutput:
    """Clipped value loss of PPO.

    V_clipped = old_values + clip(values - old_values, -clip, clip)
    L_t       = 0.5 * max((V_t - R_t)^2, (V_clipped_t - R_t)^2)
    loss      = aggregate(L, response_mask, agg, normaliser, max_length)

    ``clip=None`` gives the plain 0.5 (V - R)^2. clip_fraction is the share of response tokens
    where the clipped error is the larger one (the gradient is then 0).

    Shapes: values, old_values, returns, response_mask [B, T] -> ValueLossOutput.
    Source: Schulman et al. (2017) as implemented in OpenAI baselines ppo2; Huang et al. (2022),
    "The 37 implementation details of PPO", detail 9; used for RLHF by Ouyang et al. (2022).
    """
    unclipped = (values - returns).square()
    if clip is None:
        per_token, clipped = 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        clipped_error = (clipped_values - returns).square()
        per_token, clipped = 0.5 * torch.maximum(unclipped, clipped_error), clipped_error > unclipped
    return ValueLossOutput(
        loss=aggregate(per_token, response_mask, agg, normaliser, max_length),
        clip_fraction=masked_mean(clipped.to(values.dtype), response_mask).detach(),
    )


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    beta: float = 0.04,
    kl_kind: str = "k3",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    normaliser: float | Tensor | None = None,
    max_length: int | None = None,
    pg_loss_fn: Callable[..., PolicyLossOutput] = policy_loss,
) -> GRPOLossOutput:
    """GRPO objective: clipped policy loss plus a KL-to-reference penalty inside the loss.

    L_t  = pg_t + beta * KL_t,   KL_t = k3 = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
    loss = aggregate(L) = aggregate(pg) + beta * aggregate(KL)   (aggregate is linear)

    ``pg_loss_fn`` is any policy loss with the ``policy_loss`` signature (e.g. from
    ``get_policy_loss``). With beta = 0 the reference is not needed (``ref_logprobs=None``).

    Shapes: logprobs, old_logprobs, ref_logprobs, advantages, response_mask [B, T] -> GRPOLossOutput.
    Source: Shao et al. (2024), "DeepSeekMath", eqs. 3-4.
    """
    pg = pg_loss_fn(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        agg=agg,
        normaliser=normaliser,
        max_length=max_length,
    )
    if ref_logprobs is None:
        if beta != 0:
            raise ValueError(f"ref_logprobs is required when beta != 0 (beta={beta})")
        return GRPOLossOutput(pg.loss, pg.loss, torch.zeros_like(pg.approx_kl), pg.clip_fraction, pg.approx_kl)
    kl = kl_penalty(logprobs, ref_logprobs, kl_kind)
    loss = pg.loss + beta * aggregate(kl, response_mask, agg, normaliser, max_length)
    return GRPOLossOutput(
        loss=loss,
        pg_loss=pg.loss,
        kl=masked_mean(kl, response_mask).detach(),
        clip_fraction=pg.clip_fraction,
        approx_kl=pg.approx_kl,
    )
