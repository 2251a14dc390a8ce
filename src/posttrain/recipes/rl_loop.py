"""The one RL round of every online RL stage: PPO, GRPO (outcome and process), online RFT, critic-free PPO.

A round (`RLStepSource.generate`) runs these phases, in this order, whatever the algorithm:

    1. sample      samples_per_prompt completions of each of the round's prompts (the rollout engine)
    2. rewards     score_i = sum_k w_k f_k(completion_i) - missing-EOS penalty; process supervision adds a
                   reward per reasoning step (the recipe's `StepRewards` hook)
    3. pi_old      logprobs of the policy that sampled (and values V_old with a critic), from one no-grad pass,
                   wherever the first update's own forward cannot stand in for it: several updates per round
                   (epochs x minibatches), a critic, the KL in the reward, or an adaptive KL controller.
                   Otherwise (plain GRPO) the round's single update uses its own detached logprobs: ratio 1,
                   no extra pass. The step source decides; the loss never writes into its micro-batch.
    4. reference   logprobs of the reference policy (only when kl.coef > 0)
    5. KL          in the reward: r_t = -beta KL_t + [t last] score   (RLHF, Ziegler et al. 2019)
                   in the loss:   L_t += beta KL_t                     (GRPO, Shao et al. 2024)
    6. advantages  an estimator from the algos registry (gae, grpo, rloo, ... or one a user registered) over
                   the whole round of every rank, optionally whitened; zero-advantage groups may be dropped
    7. schedule    epochs x minibatches (train.batch_size completions: one optimizer step each) x micro-batches
                   (train.micro_batch_size rows, at most update.micro_batch_tokens positions per forward)

GRPO is the case epochs = num_iterations, one minibatch, no critic; PPO adds a critic and several minibatches.

Under torchrun every rank samples its own share of the round's prompts (whole groups); advantages, the
minibatch shuffle, the normalisers and the KL controller use the statistics of every rank, so N ranks give
the losses and weights of one process. Ranks may hold different numbers of rows in a minibatch (a global
shuffle, skipped groups): each then cuts or pads its micro-batches (a zero-weight one) so that all ranks run
the same number of forward/backward passes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from posttrain.algos import (
    AdaptiveKLController,
    AdvantageInputs,
    FixedKLController,
    aggregate,
    clip_ranges,
    explained_variance,
    get_advantage_estimator,
    get_policy_loss,
    group_success_band,
    grpo_loss,
    kl_penalty,
    masked_mean,
    masked_rescale,
    masked_sum,
    masked_whiten,
    missing_eos_penalty,
    sft_loss,
    token_rewards,
    value_loss,
    zero_advantage_groups,
)
from posttrain.data.collate import capped_rows
from posttrain.data.config import STAGE_FORMATS
from posttrain.data.pipeline import Prepared, prepare_data
from posttrain.data.tasks.base import Task
from posttrain.data.tokenize import turn_end_ids
from posttrain.eval import heldout
from posttrain.eval.report import write_training_report
from posttrain.models import count_parameters, load_tokenizer_and_model
from posttrain.models.adapters import apply_adapter, save_trained
from posttrain.models.cpu_attention import takes_prefix_tree
from posttrain.models.device import model_device, move_to
from posttrain.models.heads import floating_dtype, statistics_dtype
from posttrain.models.likelihood import response_logprobs
from posttrain.models.value import ActorCritic
from posttrain.recipes.layout import batches_for, check_sampled_length
from posttrain.recipes.rl import (
    GROUP_BASELINES,
    GoldAnswers,
    PromptStream,
    RLConfig,
    UpdateConfig,
    adapter_reference,
    build_reference,
    build_rewards,
    check_gold_answers,
    check_reward_errors,
    completions_of,
    heldout_reward_part,
    log_reward_errors,
    resolve_task,
    reward_errors_of_step,
    reward_metrics,
    rollout_batch_size,
    sample_record,
    sampling_batch_prompts,
    steps_per_round,
)
from posttrain.rewards.functions import Completions, Scores, WeightedRewards
from posttrain.rollout import Rollout, RolloutEngine, concat_rollouts, make_engine
from posttrain.rollout.recompute import (
    PaddingFree,
    completion_logprobs,
    pack_rollout,
    packed_completion_logprobs,
    packed_width_cost,
    packing_units,
    policy_forward,
    prompt_keys,
)
from posttrain.train import dist
from posttrain.train.engine import StepBatch, Trainer, forward_precision
from posttrain.train.metrics import append_jsonl
from posttrain.train.progress import RunProgress
from posttrain.train.reference import Reference
from posttrain.train.run_dir import RunResult, prepare_run_dir
from posttrain.train.seed import seed_everything, set_threads

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# The forward every pass of the round uses: actor logprobs, entropy and (with a critic) values.


def rollout_forward(model: ActorCritic, rollout: Rollout, entropy_grad: bool = False,
                    padding_free: PaddingFree | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The actor's logprobs, its entropy and the critic's values [B, T] of a rollout's completion tokens
    (0 outside the response mask; None without a critic): value t is that of the prefix before
    completion token t. With `padding_free`, over the rollout's real tokens packed into rows
    (`pack_rollout`), each prompt once per group if it says so: the same numbers, without computing
    padding or repeated prompts. The forward runs on the model's device; the values come back on the rollout's."""
    home, rollout = rollout.completion_ids.device, move_to(rollout, model_device(model))
    if padding_free is not None:
        packed = pack_rollout(rollout, padding_free.capacity, mask_dtype=floating_dtype(model),
                              share_prompts=padding_free.share_prompts, whole_groups=padding_free.whole_groups)
        logits, values = model(packed.input_ids, packed.attention_mask, packed.position_ids, keep=packed.sources,
                               tree=packed.tree)
        logprobs, entropy = packed_completion_logprobs(logits, rollout, packed, entropy_grad=entropy_grad)
        return move_to((logprobs, entropy, None if values is None else packed.scatter(values)), home)
    width = rollout.completion_ids.shape[1]
    logits, values = model(rollout.input_ids, rollout.attention_mask, rollout.position_ids, keep=width + 1)
    logprobs, entropy = completion_logprobs(logits, rollout, entropy_grad=entropy_grad)
    return move_to((logprobs, entropy, None if values is None else values[:, :-1] * rollout.response_mask), home)


def packing(cfg: UpdateConfig, *models: nn.Module | None) -> PaddingFree | None:
    """`rollout_forward`'s padding_free layout for passes of `models` (the trained module, the reference): None for
    the padded layout; groups kept whole where every one of them takes the batch's prefix tree."""
    if not cfg.padding_free:
        return None
    present = [model for model in models if model is not None]
    whole = cfg.share_prompts and bool(present) and all(takes_prefix_tree(model) for model in present)
    return PaddingFree(cfg.padding_free_capacity, cfg.share_prompts, whole_groups=whole)


def split_by_tokens(rows: Tensor, rollout: Rollout, budget: int | None,
                    padding_free: PaddingFree | None) -> list[Tensor]:
    """`rows` (longest first, or group by group) cut into micro-batches whose forward computes at most
    `budget` positions.

    Padding-free: the rows' samples are packed as the forward packs them (`packing_units`, `capped_rows`),
    and a micro-batch takes consecutive packed rows while its forward's own packing (rows x width) fits,
    so cutting adds next to no row padding. Padded (None): consecutive rows while their count x
    (longest prompt + longest completion) fits (the layout of `Rollout.select`). A packed row or sample over
    the budget goes alone; budget None keeps [rows]. Rows keep their order inside a micro-batch.
    """
    if budget is None or not len(rows):
        return [rows]
    prompts = rollout.prompt_mask[rows].sum(1).tolist()
    completions = rollout.response_mask[rows].sum(1).tolist()
    if padding_free is None:
        units = [[i] for i in range(len(rows))]

        def cost(samples: list[int]) -> int:
            return len(samples) * (max(prompts[i] for i in samples) + max(completions[i] for i in samples))
    else:
        share = padding_free.share_prompts
        keys = prompt_keys(rollout.select(rows)) if share else list(range(len(rows)))
        # Whole groups are cut at the budget here (a micro-batch's piece of a group is whole in its own forward):
        # a group larger than the budget would otherwise be one micro-batch, past the peak the budget bounds.
        cut = budget if padding_free.whole_groups else padding_free.unit_capacity
        groups = packing_units(keys, prompts, completions, share, cut)
        sizes = [prompts[g[0]] + sum(completions[i] for i in g) for g in groups]
        # each piece a unit of its own when whole: there are no rows of the capacity to join them into
        units = groups if padding_free.whole_groups else [
            [i for g in row for i in groups[g]] for row in capped_rows(sizes, padding_free.capacity)]

        def cost(samples: list[int]) -> int:
            return packed_width_cost([keys[i] for i in samples], [prompts[i] for i in samples],
                                     [completions[i] for i in samples], padding_free)
    pieces: list[list[int]] = [[]]
    for unit in units:
        if pieces[-1] and cost(sorted(pieces[-1] + unit)) > budget:
            pieces.append([])
        pieces[-1].extend(unit)
    return [rows[sorted(piece)] for piece in pieces]


def balance_micro_batches(pieces: list[Tensor]) -> list[Tensor]:
    """The same number of micro-batches on every rank (each runs a forward/backward that the others' gradient
    exchange waits for): a rank with fewer halves its largest micro-batches, and where no micro-batch has
    two rows left, adds empty ones (trained as zero-weight passes). A single process keeps its pieces."""
    pieces = [p for p in pieces if len(p)]
    target = int(dist.all_reduce_max(float(len(pieces))))
    while len(pieces) < target:
        largest = max(range(len(pieces)), key=lambda i: len(pieces[i]), default=None)
        if largest is None or len(pieces[largest]) < 2:
            pieces.append(pieces[0][:0] if pieces else torch.zeros(0, dtype=torch.long))
            continue
        half = (len(pieces[largest]) + 1) // 2
        pieces[largest:largest + 1] = [pieces[largest][:half], pieces[largest][half:]]
    return pieces


# ----------------------------------------------------------------------------------------------
# What a round is made of, and the typed micro-batch the loss reads.


@dataclasses.dataclass(frozen=True)
class StepRewards:
    """Process supervision: rewards of reasoning steps and where each ends. step_rewards, step_ends [B, S]
    (token index of each step's last token), step_mask [B, S] (1 = real step); `scores` per row for
    samples.jsonl and `metrics` for metrics.jsonl; `step_positions` [B, S] which step each is, for a baseline
    per position (None: one baseline per group)."""

    step_rewards: Tensor
    step_mask: Tensor
    step_ends: Tensor
    scores: list[list[float]]
    metrics: dict[str, float]
    step_positions: Tensor | None = None


class StepRewardsHook(Protocol):
    def __call__(self, rollout: Rollout, completions: Completions, scores: Tensor) -> StepRewards: ...


class Sampled(NamedTuple):
    """A round's phases 1 and 2: its prompt rows, their rollout (row i completes rows[prompt_index[i]]), what the
    reward functions read and gave, the score (the reward minus the missing-EOS penalty) [B], the seconds spent
    sampling, and the dynamic-sampling statistics."""

    rows: list[dict[str, Any]]
    rollout: Rollout
    completions: Completions
    scores: Scores
    score: Tensor
    generation_s: float
    metrics: dict[str, float]


@dataclasses.dataclass
class Round:
    """One round's samples and what was computed from them: [B, T] tensors but `scores` [B];
    `rows` are the round's prompt rows (rollout row i completes rows[prompt_index[i]])."""

    rows: list[dict[str, Any]]
    rollout: Rollout
    scores: Tensor
    old_logprobs: Tensor | None
    old_values: Tensor | None
    ref_logprobs: Tensor | None
    kl: Tensor | None
    beta: float
    rewards: Tensor
    advantages: Tensor
    returns: Tensor | None


@dataclasses.dataclass(frozen=True)
class RLMicroBatch:
    """One forward/backward pass of the RL loss: rows of a round's rollout and their targets, [b, T] (T the
    rows' longest completion) unless said otherwise.

    old_logprobs None means pi_old is the policy being trained, unchanged since it sampled (the round's
    single update): the loss takes its own detached logprobs. token_share and sequence_share are the
    micro-batch's share of its step's trained tokens and completions (x the number of ranks), the weights
    of its statistics; row_share its share of all the step's completions (a masked truncated one too), the weight
    of statistics of what was sampled (the KL to the reference). A zero-weight micro-batch (all-zero loss_mask)
    only keeps the ranks in step.
    """

    rollout: Rollout
    loss_mask: Tensor
    advantages: Tensor
    scores: Tensor
    """[b] the completions' scores."""
    rows: Tensor
    """[b] the rows of the round's rollout."""
    token_share: float
    sequence_share: float
    row_share: float = 0.0
    old_logprobs: Tensor | None = None
    old_values: Tensor | None = None
    returns: Tensor | None = None
    ref_logprobs: Tensor | None = None
    kl_coef: float = 0.0
    """beta of the KL in the loss (0 when it is in the reward, or there is none)."""
    sft: dict[str, Any] | None = None
    """The collated gold answers of this micro-batch's prompts (the SFT blend), or None."""
    sft_normaliser: float = 0.0
    layout: PaddingFree | None = None
    """The padding-free layout of the round's passes (`RLStepSource.padding_free`; None: padded), which the
    update's forward uses too, so that its first update sees exactly pi_old's logprobs."""
    padding: bool = False
    """A zero-weight pass that only keeps the ranks in step (its rows are a placeholder)."""


# ----------------------------------------------------------------------------------------------
# The step source: one round at a time, served as epochs x minibatches of optimizer steps.


class RLStepSource:
    """Samples a round, runs its phases (see the module doc) and serves its optimizer steps.

    `model` is the trained module (actor, and a critic or value head when the estimator needs values).
    `step_rewards` is the process-supervision hook; `gold` the data of the SFT blend. The state is the
    prompt stream's position, the step count and the KL controller: a resumed run starts a fresh round.
    """

    samples_from_policy = True  # the Trainer gathers FSDP-sharded weights around `next_step`

    def __init__(self, cfg: RLConfig, prepared: Prepared, engine: RolloutEngine, model: ActorCritic,
                 rewards: WeightedRewards, *, task: Task | None = None, reference: Reference | None = None,
                 step_rewards: StepRewardsHook | None = None, gold: GoldAnswers | None = None,
                 samples: Path | None = None, progress: RunProgress | None = None) -> None:
        self.cfg, self.engine, self.model, self.rewards, self.task = cfg, engine, model, rewards, task
        self.reference, self.step_rewards, self.gold, self.samples = reference, step_rewards, gold, samples
        self.progress = progress or RunProgress(enabled=False)
        self.minibatches = rollout_batch_size(cfg) // cfg.train.batch_size
        self.round_prompts = rollout_batch_size(cfg) // cfg.sampling.samples_per_prompt  # of every rank
        self.prompts = PromptStream(prepared.dataset, sampling_batch_prompts(cfg), cfg.run.seed, prepared.source,
                                    cfg.sampling.max_sequences)
        self.params = cfg.sampling.params()
        self.kl = (AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.controller == "adaptive"
                   else FixedKLController(cfg.kl.coef))
        # pi_old needs a pass of its own unless the round's single update computes it (see the module doc).
        self.old_pass = (self.cfg.update.epochs * self.minibatches > 1 or model.has_values
                         or (cfg.kl.placement == "reward" and cfg.kl.coef > 0) or cfg.kl.controller == "adaptive")
        self.steps = 0
        self.queue: list[StepBatch] = []
        self.last: Round | None = None
        self.told_untrained = False

    @functools.cached_property
    def padding_free(self) -> PaddingFree | None:
        """The layout of the round's padding-free passes, decided at the first round: the Trainer has moved the
        model to its device by then."""
        return packing(self.cfg.update, self.model, self.reference.model if self.reference is not None else None)

    def next_step(self) -> StepBatch:
        if not self.queue:
            # A run resumed inside a round (a signal's checkpoint) samples a fresh one for that round's remaining
            # steps only: later rounds then start where the uninterrupted run's do, and so do their checkpoints.
            per_round = steps_per_round(self.cfg)
            self.queue = self.generate()[:per_round - self.steps % per_round]
        self.steps += 1
        return self.queue.pop(0)

    def steps_left_in_round(self) -> int:
        """The round's steps still to train: a stop waits for them (`Trainer.fit`), since a run resumed inside a
        round samples another one from the updated policy and goes on differently."""
        return len(self.queue)

    def state_dict(self) -> dict[str, Any]:
        return {**self.prompts.state_dict(), "steps": self.steps, "kl": self.kl.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict(state)
        self.kl.load_state_dict(state["kl"])
        self.steps, self.queue = state["steps"], []

    def generate(self) -> list[StepBatch]:
        """One round, phase by phase."""
        start = time.perf_counter()
        reward_errors_of_step(self.rewards, self.steps + 1)
        rows, rollout, completions, scores, score, generation_s, filtered = self._sample()   # 1. and 2.
        check_reward_errors(self.rewards)
        if self.gold is not None:
            self.gold.prepare(rows)
        steps = self.step_rewards(rollout, completions, score) if self.step_rewards is not None else None
        span = dist.rank_span(len(score))  # this rank's rows among the round's rows of every rank
        schedule = self._schedule(rollout, torch.ones(len(score), dtype=torch.bool), span)
        first_epoch = [piece for minibatch in schedule[0] for piece in minibatch]
        old_logprobs, old_values = self._old_pass(rollout, first_epoch) if self.old_pass else (None, None)  # 3.
        ref_logprobs = self._reference_pass(rollout, first_epoch) if self.reference is not None else None  # 4.
        mask = rollout.response_mask
        kl = (kl_penalty(old_logprobs, ref_logprobs, self.cfg.kl.kind) * mask
              if old_logprobs is not None and ref_logprobs is not None else None)                  # 5. KL
        beta = self.kl.beta
        in_reward = kl if self.cfg.kl.placement == "reward" else None
        rewards = token_rewards(score.double(), mask, in_reward, beta)
        advantages, returns = self._advantages(rewards, old_values, rollout, steps, span[0])     # 6. advantages
        zero_groups = zero_advantage_groups(advantages, rollout.prompt_index)
        keep = ~zero_groups if self.cfg.advantage.skip_zero_variance else torch.ones_like(zero_groups)
        failed = scores.failed()  # rows left in only where none was scored (`without_failed_rows`): no loss on them
        keep &= ~failed
        if dist.all_reduce_max(float(not bool(keep.all()))) > 0:  # some rank left rows out: its schedule changed
            schedule = self._schedule(rollout, keep, span)                                        # 7. schedule
        self.last = Round(rows, rollout, score, old_logprobs, old_values, ref_logprobs, kl, beta, rewards,
                          advantages, returns)
        metrics = self._metrics(completions, scores, steps, zero_groups, span[1]) | filtered
        metrics["trained_fraction"] = self._trained_fraction(rollout, keep, failed, span[1])
        if kl is not None:
            self.kl.update(metrics["kl"], span[1])
        self._write_samples(completions, scores, steps)
        metrics.update(generation_s=generation_s, scoring_s=time.perf_counter() - start - generation_s)
        return self._step_batches(schedule, metrics)

    def _trained_fraction(self, rollout: Rollout, keep: Tensor, failed: Tensor, total: int) -> float:
        """The share of the round's completions (of every rank: `total`) with a token in the loss. A round with none
        trains nothing (its steps' gradients are zero), which no other metric says outright: said once per run,
        with what left its completions out (rewards that failed on every one, groups that tied under
        advantage.skip_zero_variance, completions cut at max_new_tokens under loss.mask_truncated)."""
        cut = rollout.truncated if self.cfg.loss.mask_truncated else torch.zeros_like(keep)
        in_loss, errors, tied, truncated = [dist.all_reduce_sum(float(rows.sum())) for rows in (
            keep & ~cut, failed, ~keep & ~failed, keep & cut)]
        if in_loss == 0 and not self.told_untrained:
            reasons = []
            if errors:
                reasons.append(f"{errors:.0f} whose rewards failed (grader_errors.jsonl)")
            if tied:
                reasons.append(f"{tied:.0f} in groups whose completions tied (advantage.skip_zero_variance=true "
                               "leaves them out)")
            if truncated:
                reasons.append(f"{truncated:.0f} cut at sampling.max_new_tokens={self.cfg.sampling.max_new_tokens} "
                               "(loss.mask_truncated=true leaves them out)")
            if dist.context().is_main:  # the counts are every rank's: said once, not once per rank
                logger.warning("round %d: none of its %d completions is in the loss, so its steps train nothing: %s. "
                               "Said once; the trained_fraction metric counts every round", self.prompts.rounds, total,
                               "; ".join(reasons))
            self.told_untrained = True
        return in_loss / total

    # -- phase 1 and 2: sample and score, until the round has its informative groups ----------------

    def _sample(self) -> Sampled:
        """The round's prompt rows and their rollout, scored, with the seconds spent sampling and the filter's
        statistics.

        Without `filter`: one batch of the round's prompts. With it (dynamic sampling), batches of
        `filter.oversample` x the round's prompts until every rank holds the round's number of groups in the
        band (`group_success_band`), or `filter.max_batches` were sampled; the round trains on the first groups
        in the band, filled up if short with the others (spread first, then nearest the band), so that every
        rank trains on the same number of groups. All batches come from the same policy: still on-policy.
        """
        cfg, need = self.cfg.filter, self.round_prompts // dist.context().world_size
        batches: list[tuple[list[dict[str, Any]], Rollout, Scores, Tensor]] = []
        generation_s, kept, failed_rows = 0.0, 0, 0
        per_batch = self.prompts.per_round
        # The bar counts this rank's prompts; a dynamic-sampling round that needs another batch extends it.
        with self.progress.phase(f"sampling round {self.steps // steps_per_round(self.cfg) + 1}: prompts",
                                 per_batch) as bar:
            while True:
                start = time.perf_counter()
                rows, rollout = self.prompts.sample(self.engine, self.params, bar.advance)
                generation_s += time.perf_counter() - start
                rows, rollout, scores, failed = without_failed_rows(rows, rollout,
                                                                    self.rewards(completions_of(rollout, rows)))
                failed_rows += failed
                score = missing_eos_penalty(scores.total, rollout.truncated, self.cfg.reward.missing_eos_penalty)
                batches.append((rows, rollout, scores, score))
                if not cfg.enabled:
                    return Sampled(rows, rollout, completions_of(rollout, rows), scores, score, generation_s,
                                   {"failed_rows": dist.all_reduce_sum(float(failed))})
                kept += int(group_success_band(score, rollout.prompt_index, cfg.low, cfg.high).keep.sum())
                if dist.all_reduce_min(float(kept)) >= need or len(batches) >= cfg.max_batches:
                    break
                bar.update(total=per_batch * (len(batches) + 1))
        rows = [row for batch in batches for row in batch[0]]
        rollout = concat_rollouts([batch[1] for batch in batches])
        scores, score = Scores.concat([batch[2] for batch in batches]), torch.cat([batch[3] for batch in batches])
        band = group_success_band(score, rollout.prompt_index, cfg.low, cfg.high)
        # The groups in the band, then the others to fill up: those with spread first, then nearest the band.
        others = sorted((i for i in range(len(band.groups)) if not band.keep[i]),
                        key=lambda i: (not band.spread[i], float(band.distance[i])))
        chosen = torch.cat([band.groups[band.keep], band.groups[others]])[:need]
        picked = torch.cat([torch.nonzero(rollout.prompt_index == g).flatten() for g in chosen.tolist()])
        renumbered = torch.repeat_interleave(torch.arange(len(chosen)), torch.bincount(rollout.prompt_index)[chosen])
        trained = dataclasses.replace(rollout.select(picked), prompt_index=renumbered)
        metrics = {"kept_fraction": dist.all_reduce_sum(float(band.keep.sum())) / dist.all_reduce_sum(len(band.groups)),
                   "prompts_sampled": dist.all_reduce_sum(float(len(band.groups))), "sampling_batches": len(batches),
                   "filled_groups": dist.all_reduce_sum(float(max(0, need - int(band.keep.sum())))),
                   "sampled_score": dist.all_reduce_sum(float(score.sum())) / dist.all_reduce_sum(float(len(score))),
                   "failed_rows": dist.all_reduce_sum(float(failed_rows))}
        chosen_rows = [rows[g] for g in chosen.tolist()]
        return Sampled(chosen_rows, trained, completions_of(trained, chosen_rows), scores.select(picked.tolist()),
                       score[picked], generation_s, metrics)

    # -- phase 3 and 4: the no-grad passes -------------------------------------------------------

    @torch.no_grad()
    def _old_pass(self, rollout: Rollout, pieces: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        """pi_old's logprobs and V_old of every row (None without a critic), computed on the micro-batches the
        first epoch trains on, so that its first update sees exactly ratio 1."""
        dtype = statistics_dtype(self.model)
        logprobs = torch.zeros(rollout.logprobs.shape, dtype=dtype)
        values = torch.zeros(rollout.logprobs.shape, dtype=dtype) if self.model.has_values else None
        was_training = self.model.training
        self.model.eval()
        try:
            for rows in (p for p in pieces if len(p)):
                sub = rollout.select(rows)
                width = sub.completion_ids.shape[1]
                sub_logprobs, _, sub_values = rollout_forward(self.model, sub, padding_free=self.padding_free)
                logprobs[rows, :width] = sub_logprobs
                if values is not None:
                    values[rows, :width] = sub_values
        finally:
            self.model.train(was_training)
        return logprobs, values

    def _reference_pass(self, rollout: Rollout, pieces: list[Tensor]) -> Tensor:
        """The reference's logprobs on the same micro-batches and layout as the policy's, so that a reference
        equal to the policy gives exactly its logprobs (KL exactly 0 at the start)."""
        forward = policy_forward(self.padding_free)
        out = torch.zeros(rollout.logprobs.shape, dtype=statistics_dtype(self.model))
        for rows in (p for p in pieces if len(p)):
            sub = rollout.select(rows)
            out[rows, :sub.completion_ids.shape[1]] = self.reference.rollout_logprobs(sub, forward)
        return out

    # -- phase 6: advantages over every rank's rows ----------------------------------------------

    def _advantages(self, rewards: Tensor, values: Tensor | None, rollout: Rollout, steps: StepRewards | None,
                    first: int) -> tuple[Tensor, Tensor | None]:
        """The estimator's advantages (in `statistics_dtype`) and value targets (None without a critic) of this
        rank's rows (the round's rows `first`, `first + 1`, ... of every rank), computed on the whole round of
        every rank (batch statistics, whitening), in float64."""
        mask = rollout.response_mask
        # Prompt ids restart at 0 on every rank: made distinct before the ranks' rows meet.
        span = int(dist.all_reduce_max(float(rollout.prompt_index.max()) + 1))
        fields = {"rewards": rewards, "response_mask": mask.double(),
                  "group_ids": rollout.prompt_index + dist.context().rank * span}
        if values is not None:
            fields["values"] = values.double()
        if steps is not None:
            fields |= {"step_rewards": steps.step_rewards.double(), "step_mask": steps.step_mask,
                       "step_ends": steps.step_ends}
            if steps.step_positions is not None:
                fields["step_positions"] = steps.step_positions
        gathered = {name: dist.all_gather_ragged(tensor)[0] for name, tensor in fields.items()}
        estimator = "grpo_process" if steps is not None else self.cfg.advantage.estimator
        advantages, returns = get_advantage_estimator(estimator)(
            AdvantageInputs(**gathered), gamma=self.cfg.advantage.gamma, lam=self.cfg.advantage.lam,
            eps=self.cfg.advantage.eps)
        if self.cfg.advantage.whiten:
            # A group baseline has already centred each completion on its group's: the round's scale alone, so a
            # group whose completions tie keeps advantage 0 (subtracting the round's token-weighted mean would push
            # every such group one way, by how length goes with reward elsewhere, and skip_zero_variance would
            # find no group to skip).
            whiten = masked_rescale if estimator in GROUP_BASELINES else masked_whiten
            advantages = whiten(advantages, gathered["response_mask"])
        mine = slice(first, first + len(mask))
        width = mask.shape[1]
        dtype = statistics_dtype(self.model)  # float32, or a float64 model's float64 (checks against references)
        advantages = advantages[mine, :width].to(dtype)
        return advantages, returns[mine, :width].to(dtype) if values is not None else None

    # -- phase 7: epochs x minibatches x micro-batches -------------------------------------------

    def _schedule(self, rollout: Rollout, keep: Tensor, span: tuple[int, int]) -> list[list[list[Tensor]]]:
        """epochs -> minibatches -> micro-batches (this rank's row indices). Every epoch shuffles the round's
        rows over all ranks with one seeded permutation (none with a single minibatch: a shuffle then changes
        nothing) and cuts it into minibatches; a rank takes its kept rows of each, longest first (so a
        micro-batch pads to its own longest row), in micro-batches as many as on every other rank. `span` is
        `dist.rank_span` of the round's rows."""
        count, (first, total) = len(keep), span
        lengths = rollout.prompt_mask.sum(1) + rollout.response_mask.sum(1)
        schedule = []
        for epoch in range(self.cfg.update.epochs):
            order = torch.arange(total)
            if self.minibatches > 1:
                seed = (self.cfg.run.seed * 1_000_003 + self.prompts.rounds) * 1_009 + epoch
                order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
            minibatches = []
            for chunk in order.tensor_split(self.minibatches):
                rows = chunk[(chunk >= first) & (chunk < first + count)] - first
                rows = self._ordered(rows[keep[rows]], rollout, lengths)
                pieces = [piece for micro in rows.split(self.cfg.train.micro_batch_size)
                          for piece in split_by_tokens(micro, rollout, self.cfg.update.micro_batch_tokens,
                                                       self.padding_free)]
                minibatches.append(balance_micro_batches(pieces))
            schedule.append(minibatches)
        return schedule

    def _ordered(self, rows: Tensor, rollout: Rollout, lengths: Tensor) -> Tensor:
        """Longest first, so a micro-batch pads to its own longest row; with shared prompts, group by group
        (longest group first), so that a group lands in one micro-batch and its prompt is computed once."""
        rows = rows[torch.sort(lengths[rows], descending=True, stable=True).indices]
        if self.padding_free is None or not self.padding_free.share_prompts or not len(rows):
            return rows
        keys = prompt_keys(rollout.select(rows))
        prompt_tokens = rollout.prompt_mask[rows].sum(1)
        group_tokens: dict[tuple[int, ...], int] = {}
        for key, total, prompt in zip(keys, lengths[rows].tolist(), prompt_tokens.tolist(), strict=True):
            group_tokens[key] = group_tokens.get(key, prompt) + total - prompt
        first_seen = {key: i for i, key in reversed(list(enumerate(keys)))}
        order = sorted(range(len(rows)), key=lambda i: (-group_tokens[keys[i]], first_seen[keys[i]], i))
        return rows[order]

    def _step_batches(self, schedule: list[list[list[Tensor]]], metrics: dict[str, float]) -> list[StepBatch]:
        batch = self.last
        rollout = batch.rollout
        loss_mask = rollout.response_mask.float()
        if self.cfg.loss.mask_truncated:
            loss_mask = loss_mask * (~rollout.truncated).unsqueeze(1).float()
        # The rows with a token in the loss: a sequence mean is over them (a masked truncated row is not one).
        trained = loss_mask.sum(dim=1) > 0
        world = dist.context().world_size
        in_loss = self.cfg.kl.placement == "loss"
        out = []
        for epoch, minibatches in enumerate(schedule):
            for index, pieces in enumerate(minibatches):
                rows = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
                token_total = dist.all_reduce_sum(float(loss_mask[rows].sum()))
                row_total = dist.all_reduce_sum(float(trained[rows].sum()))
                sampled_total = dist.all_reduce_sum(float(len(rows)))
                normaliser = (token_total or 1.0) if self.cfg.loss.agg == "token-mean" else max(row_total, 1.0)
                micro = []
                for piece in pieces:
                    padding = not len(piece)  # a zero-weight pass: any row, nothing trained
                    sub_rows = piece if not padding else torch.zeros(1, dtype=torch.long)
                    sub = rollout.select(sub_rows)
                    width = sub.completion_ids.shape[1]
                    mask = loss_mask[sub_rows, :width] * (0.0 if padding else 1.0)
                    micro.append(RLMicroBatch(
                        rollout=sub, loss_mask=mask, advantages=batch.advantages[sub_rows, :width],
                        scores=batch.scores[sub_rows], rows=sub_rows,
                        token_share=float(mask.sum()) * world / token_total if token_total else 0.0,
                        sequence_share=0.0 if padding else float(trained[piece].sum()) * world / max(row_total, 1.0),
                        row_share=0.0 if padding else len(piece) * world / max(sampled_total, 1.0),
                        old_logprobs=_rows(batch.old_logprobs, sub_rows, width),
                        old_values=_rows(batch.old_values, sub_rows, width),
                        returns=_rows(batch.returns, sub_rows, width),
                        ref_logprobs=_rows(batch.ref_logprobs, sub_rows, width) if in_loss else None,
                        kl_coef=batch.beta if in_loss else 0.0, padding=padding, layout=self.padding_free))
                if self.gold is not None:
                    micro = self._with_gold(micro)
                tokens = int(dist.all_reduce_sum(float(rollout.prompt_mask[rows].sum()
                                                       + rollout.response_mask[rows].sum())))
                step_metrics = {**metrics, "epoch": epoch + 1, "minibatch": index + 1}
                if out:  # the round's cost is reported once, with its first step
                    step_metrics.update(generation_s=0.0, scoring_s=0.0)
                out.append(StepBatch(micro_batches=micro, normaliser=normaliser, tokens=tokens, metrics=step_metrics))
        return out

    def _with_gold(self, micro: list[RLMicroBatch]) -> list[RLMicroBatch]:
        """Each micro-batch with the gold rows of its prompts that no earlier micro-batch of the minibatch had,
        and the minibatch's gold-token count (of every rank), the SFT term's normaliser."""
        seen: set[int] = set()
        golds, count = [], 0.0
        for batch in micro:
            prompts = [] if batch.padding else batch.rollout.prompt_index.tolist()
            fresh = [p for p in dict.fromkeys(prompts) if p not in seen]
            seen.update(fresh)
            gold, tokens = self.gold.batch(fresh)
            golds.append(gold)
            count += tokens
        # The Trainer hands losses normaliser / world_size (DDP averages the ranks' gradients); the same here.
        normaliser = dist.all_reduce_sum(count) / dist.context().world_size
        return [dataclasses.replace(b, sft=g, sft_normaliser=normaliser) for b, g in zip(micro, golds, strict=True)]

    # -- what the round reports ------------------------------------------------------------------

    def _metrics(self, completions: Completions, scores: Scores, steps: StepRewards | None, zero_groups: Tensor,
                 total: int) -> dict[str, float]:
        """The round's statistics; `total` counts the round's completions on every rank."""
        batch, mask = self.last, self.last.rollout.response_mask
        metrics = {**reward_metrics(batch.rollout, completions, scores, self.task),
                   "score": batch.scores.mean().item(), "beta": batch.beta,
                   "zero_variance_groups": zero_groups.float().mean().item()}
        raw = batch.advantages if batch.returns is None else batch.returns - batch.old_values
        metrics["advantages"], metrics["advantages_std"] = dist.mean_and_std_over_ranks(raw, mask)
        if batch.kl is not None:
            sequence_kl = batch.kl.sum(dim=1)
            kl = dist.all_reduce_sum(sequence_kl.sum().item()) / total
            metrics |= {"kl": kl, "non_score_reward": -batch.beta * kl}
        if batch.old_logprobs is not None:
            metrics["logprob_mismatch"] = masked_mean((batch.rollout.logprobs - batch.old_logprobs).abs(), mask).item()
        if batch.returns is not None:
            metrics |= {"returns": masked_mean(batch.returns, mask).item(),
                        "values": masked_mean(batch.old_values, mask).item(),
                        "value_explained_variance": explained_variance(batch.old_values, batch.returns, mask)}
        return metrics | (steps.metrics if steps is not None else {})

    def _write_samples(self, completions: Completions, scores: Scores, steps: StepRewards | None) -> None:
        if self.samples is None or not dist.context().is_main:
            return
        batch = self.last
        records = []
        for i in range(len(completions)):
            record = {**sample_record(self.steps + 1, i, batch.rollout, completions, scores),
                      "score": batch.scores[i].item(), "advantage": batch.advantages[i, 0].item()}
            if batch.kl is not None:
                record["kl"] = batch.kl[i].sum().item()
            if steps is not None:
                record["step_scores"] = steps.scores[i]
            records.append(record)
        append_jsonl(self.samples, records)


def without_failed_rows(rows: list[dict[str, Any]], rollout: Rollout,
                        scores: Scores) -> tuple[list[dict[str, Any]], Rollout, Scores, int]:
    """The sampled prompts `rows`, their rollout and scores without the completions some reward function failed to
    score (raised, timed out, returned NaN), and how many those were. Such a completion's 0 is no evidence about it:
    trained on, it would pull its group's baseline down and push the policy away from it (a grader that times out
    on long answers would teach short ones), so it is left out of the round, its baseline and every loss; a prompt
    whose every completion failed leaves with its group. A round (or, under torchrun, any rank: a rank cannot sit
    out a round) that would be left with no completion keeps them all, scored 0 and counted as failures, and the
    round's loss leaves the failed ones out (`RLStepSource.generate`): that round trains nothing, and says so."""
    failed = scores.failed()
    picked = torch.nonzero(~failed).flatten()
    if dist.all_reduce_min(float(len(picked))) == 0 or len(picked) == len(failed):
        return rows, rollout, scores, int(failed.sum())
    groups, renumbered = torch.unique(rollout.prompt_index[picked], return_inverse=True)
    kept = dataclasses.replace(rollout.select(picked), prompt_index=renumbered)
    return [rows[g] for g in groups.tolist()], kept, scores.select(picked.tolist()), int(failed.sum())


def _rows(tensor: Tensor | None, rows: Tensor, width: int) -> Tensor | None:
    return None if tensor is None else tensor[rows, :width]


# ----------------------------------------------------------------------------------------------
# The loss of the family.


def rl_loss_fn(cfg: RLConfig, max_new_tokens: int):
    """The loss of a micro-batch, already divided by its step's normaliser:

        L = aggregate(clipped surrogate [+ beta KL_t in the loss]) + vf_coef * clipped value loss
            - entropy_coef * aggregate(entropy) + sft_coef * NLL(gold answers)

    Statistics are weighted by the micro-batch's token share (per-token ones) or sequence share, so the
    Trainer's sum over micro-batches is the step's mean. The micro-batch is only read.
    """
    loss_cfg = cfg.loss
    pg_loss_fn = get_policy_loss(loss_cfg.policy_loss)
    clip_low, clip_high = clip_ranges(pg_loss_fn, loss_cfg.clip_low, loss_cfg.clip_high)

    def loss_fn(model: ActorCritic, batch: RLMicroBatch, normaliser: float) -> tuple[Tensor, dict[str, float]]:
        mask, share = batch.loss_mask, batch.token_share
        logprobs, entropy, values = rollout_forward(model, batch.rollout, entropy_grad=loss_cfg.entropy_coef > 0,
                                                    padding_free=batch.layout)
        first = batch.old_logprobs is None  # pi_old is this very forward: the round's single update
        old_logprobs = logprobs.detach() if first else batch.old_logprobs
        out = grpo_loss(logprobs, old_logprobs, batch.ref_logprobs if batch.kl_coef > 0 else None,
                        batch.advantages, mask, beta=batch.kl_coef, kl_kind=cfg.kl.kind, clip_low=clip_low,
                        clip_high=clip_high, dual_clip=loss_cfg.dual_clip, agg=loss_cfg.agg,
                        normaliser=normaliser, max_length=max_new_tokens, pg_loss_fn=pg_loss_fn)
        loss = out.loss
        ratio = torch.exp(logprobs.detach() - old_logprobs)
        metrics = {"pg_loss": out.pg_loss.item(), "clip_fraction": out.clip_fraction.item() * share,
                   "approx_kl": out.approx_kl.item() * share, "ratio": masked_mean(ratio, mask).item() * share,
                   "entropy": masked_mean(entropy.detach(), mask).item() * share}
        if values is not None:
            vf = value_loss(values, batch.old_values, batch.returns, mask, clip=loss_cfg.value_clip, agg=loss_cfg.agg,
                            normaliser=normaliser, max_length=max_new_tokens)
            loss = loss + loss_cfg.vf_coef * vf.loss
            metrics |= {"value_loss": vf.loss.item(), "value_clip_fraction": vf.clip_fraction.item() * share}
        if loss_cfg.entropy_coef > 0:
            loss = loss - loss_cfg.entropy_coef * aggregate(entropy, mask, loss_cfg.agg, normaliser, max_new_tokens)
        if loss_cfg.sft_coef > 0 and batch.sft is not None:
            gold_logprobs, gold_mask = response_logprobs(model.actor, batch.sft)
            sft = sft_loss(gold_logprobs, gold_mask, normaliser=batch.sft_normaliser)
            loss = loss + loss_cfg.sft_coef * sft
            metrics["sft_loss"] = sft.item()
        if first:  # statistics of pi_old that no pass of the step source measured
            mismatch = (batch.rollout.logprobs - old_logprobs).abs()
            metrics["logprob_mismatch"] = masked_mean(mismatch, mask).item() * share
            if batch.ref_logprobs is not None:
                kl = kl_penalty(old_logprobs, batch.ref_logprobs, cfg.kl.kind)
                sequence_kl = masked_sum(kl, batch.rollout.response_mask, dim=-1)
                # over every completion of the step, as the round's KL is (`_metrics`): with loss.mask_truncated a
                # weight of the trained ones only made it depend on how the step was cut into micro-batches
                metrics["kl"] = sequence_kl.mean().item() * batch.row_share
        metrics["loss"] = loss.item()
        return loss, metrics

    return loss_fn


# ----------------------------------------------------------------------------------------------
# A whole RL run: what every RL recipe's main does, given its trained module and hooks.


def train_rl(cfg: RLConfig, *, stage: str, title: str, build_model: Callable[[nn.Module], ActorCritic],
             step_rewards: Callable[[Task | None, PreTrainedTokenizerBase], StepRewardsHook | None] = (
                 lambda task, tokenizer: None),
             summary: Callable[[RLStepSource], dict[str, Any]] = lambda source: {},
             rewards: WeightedRewards | None = None, lr_by_prefix: Mapping[str, float] | None = None) -> RunResult:
    """Load, prepare, sample and train: `build_model(actor)` is the trained module (the recipe's critic),
    `step_rewards(task, tokenizer)` the process-supervision hook, `summary(source)` the recipe's own summary keys;
    `rewards` replaces the ones built from cfg.reward; `lr_by_prefix` gives parameters of the trained module (by
    name prefix) a peak lr of their own (the critic's)."""
    set_threads(cfg.run.threads)  # as `stage_main` did: set here too for callers of train_rl (or train_ppo) itself
    seed_everything(cfg.run.seed)
    tokenizer, actor = load_tokenizer_and_model(cfg.model)
    cfg = batches_for(cfg, actor)
    progress = RunProgress.for_run(cfg.run)
    prepared = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS[stage], mask_dtype=actor.dtype,
                            bars=progress.library_bars())
    check_sampled_length(actor, prepared.tokenized.stats.length_max, cfg.sampling.max_new_tokens)
    check_gold_answers(prepared.dataset, prepared.tokenized.name, cfg, uses_gold=cfg.loss.sft_coef > 0)
    rows = heldout.prepare_heldout(cfg.data, cfg.eval, tokenizer, prepared.format, actor.dtype, progress)
    task = resolve_task(cfg)
    rewards = rewards if rewards is not None else build_rewards(cfg.reward, task, prepared.dataset, cfg.eval)
    hook = step_rewards(task, tokenizer)
    run_dir = prepare_run_dir(cfg.run, cfg, stage=stage, model=actor)
    log_reward_errors(rewards, cfg.reward, run_dir.path)
    evaluation = heldout.Evaluation(heldout.accuracy_part(tokenizer, cfg.data, cfg.eval)
                                    + heldout_reward_part(cfg, tokenizer, rows, rewards), run_dir.samples, progress)

    with forward_precision(cfg.train, actor):
        before = evaluation.run(actor, 0) if cfg.eval_before and evaluation else None
    reference = build_reference(cfg.kl.coef, cfg.adapter, actor)
    actor = apply_adapter(actor, cfg.adapter)
    reference = adapter_reference(reference, cfg.kl.coef, actor)
    model = build_model(actor)
    gold = GoldAnswers(tokenizer, cfg.data) if cfg.loss.sft_coef > 0 else None
    source = RLStepSource(cfg, prepared, make_engine(cfg.sampling.engine, actor, tokenizer), model, rewards,
                          task=task, reference=reference, step_rewards=hook, gold=gold, samples=run_dir.samples,
                          progress=progress)
    trainer = Trainer(stage=stage, cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim, run_dir=run_dir,
                      model=model, tokenizer=tokenizer, progress=progress, lr_by_prefix=lr_by_prefix)
    result = trainer.fit(source, rl_loss_fn(cfg, cfg.sampling.max_new_tokens), evaluation.evaluator(actor),
                         progress_keys=("reward", "kl", "accuracy", "eval_reward", "eval_accuracy"))

    final_dir = save_trained(actor, tokenizer, run_dir.final, cfg.adapter, turn_end_ids(tokenizer))
    last = result.last
    keys = ("score", "reward", "accuracy", "kl", "beta", "value_explained_variance", "entropy", "completion_length")
    summary = {"advantage": cfg.advantage.estimator, "samples_per_prompt": cfg.sampling.samples_per_prompt,
               **summary(source), "trainable_parameters": count_parameters(model, trainable_only=True),
               **result.totals(), "rounds": math.ceil(source.steps / steps_per_round(cfg)),  # the last may end early
               "sampling_batches": source.prompts.rounds, **{k: last[k] for k in keys if k in last},
               **heldout.summary(before, last, cfg.eval, cfg.data, rows)}
    write_training_report(run_dir, title, summary)
    return RunResult(run_dir=run_dir.path, final_dir=final_dir, summary=summary)
