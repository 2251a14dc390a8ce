"""Direct preference optimisation: learn from comparisons without a reward model or sampling.

    h    = (logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)     (sequence logprobs, answer tokens)
    loss = -log sigmoid(beta h)                                            (sigmoid; ipo, hinge, robust by option)
    rankings of K responses: the Plackett–Luce likelihood of the ranking under the implicit rewards
    r_k = beta (logp_k - ref_k) — pairwise sigmoid DPO at K = 2.

DPO is one more weighted-likelihood objective: its gradient raises the likelihood of the chosen
answer and lowers the rejected one's, each weighted by how wrongly the implicit reward model
currently orders the pair (sigmoid(-beta h)).

Chosen and rejected (or all K ranked responses) of a micro-batch go through one forward (padded, or
padding-free: all in one row). By default the reference's logprobs of every row are computed once,
before training, by the starting policy itself (before its first update it *is* the reference):
no copy is ever made, and each step is one forward and backward of the policy only. Without the
cache the reference is a frozen copy of the starting model or — with LoRA — the policy with its
adapter disabled (the base weights, no second copy). The metrics are the implicit rewards of chosen and rejected, the
preference accuracy and margin of those rewards, and the sequence logprobs; held-out exact match
is measured before and after.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.algos import DPO_KINDS, dpo_loss, dpo_plackett_luce_loss, soft_label_flip
from posttrain.config import ModelConfig, OptimConfig, RunConfig, param, section
from posttrain.data.columns import column_values
from posttrain.data.config import STAGE_FORMATS, ColumnsConfig, DataConfig
from posttrain.data.pipeline import Prepared, prepare_data
from posttrain.data.tokenize import turn_end_ids
from posttrain.errors import ConfigError, DataError
from posttrain.eval import heldout
from posttrain.eval.accuracy import EvalConfig
from posttrain.eval.report import write_training_report
from posttrain.models import count_parameters, load_tokenizer_and_model
from posttrain.models.adapters import AdapterConfig, apply_adapter, save_trained
from posttrain.models.heads import floating_dtype
from posttrain.models.likelihood import per_sequence_sums, response_logprobs
from posttrain.recipes.layout import batches_for
from posttrain.recipes.rl import (
    PromptStream,
    RewardConfig,
    SamplingConfig,
    build_rewards,
    check_gold_answers,
    check_reward_errors,
    check_reward_functions,
    check_sampling,
    completions_of,
    heldout_reward_part,
    log_reward_errors,
    preference_rows,
    resolve_task,
    reward_errors_of_step,
)
from posttrain.rewards.functions import WeightedRewards
from posttrain.rollout import RolloutEngine, make_engine
from posttrain.train import dist
from posttrain.train.comparisons import (
    best_and_others,
    comparison_levels,
    comparison_matrix,
    is_ranking_batch,
    ordered_pair_accuracy,
)
from posttrain.train.engine import StepBatch, TrainConfig, Trainer, forward_precision
from posttrain.train.entry import stage_main
from posttrain.train.progress import RunProgress
from posttrain.train.reference import (
    Reference,
    ReferenceConfig,
    cached_step_source,
    load_reference,
    offline_comparisons,
    precompute_sequence_logprobs,
)
from posttrain.train.run_dir import RunResult, prepare_run_dir
from posttrain.train.sources import ShuffledStepSource

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DPOLossConfig:
    kind: str = param("sigmoid", "sigmoid (DPO), ipo, hinge (SLiC) or robust (rDPO); rankings use the "
                                 "Plackett–Luce form of sigmoid.", choices=DPO_KINDS)
    beta: float = param(0.1, "Strength of the pull towards the reference (larger: stay closer).", gt=0)
    label_smoothing: float = param(0.0, "Assumed probability that a pair's label is flipped (cDPO for sigmoid, "
                                        "rDPO for robust).", ge=0, lt=0.5)
    sft_weight: float = param(0.0, "Weight of an added length-normalised NLL of the chosen answer (RPO; 0: off).",
                              ge=0)


PAIR_SOURCES = ("offline", "on_policy")


@dataclasses.dataclass(frozen=True)
class PairsConfig:
    source: str = param("offline", "offline: the data's preference pairs or rankings. on_policy: pairs sampled "
                                   "from the policy: the data's verifiable rows (prompt + answer) are prompts, "
                                   "each gets sampling.samples_per_prompt completions, scored by `reward`, and "
                                   "its best- and worst-scored completions make a pair (with the task verifier: "
                                   "a correct and an incorrect one).", choices=PAIR_SOURCES)
    prompts_per_round: int = param(512, "On-policy: prompts sampled per round.", ge=1)
    resample_every: int = param(0, "On-policy: optimizer steps between rounds; each round samples fresh pairs "
                                   "from the current policy (iterative DPO). 0: one round, from the starting "
                                   "model, before training.", ge=0)
    min_margin: float = param(0.0, "On-policy: a pair needs its chosen score to beat the rejected one by more than "
                                   "this.", ge=0)
    finished_only: bool = param(True, "On-policy: completions cut at sampling.max_new_tokens take part in no pair "
                                      "(as a row each would end with an end-of-turn token the policy never "
                                      "sampled, and DPO would teach it to stop mid-answer).")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    run: RunConfig = section(lambda: RunConfig(name="dpo"), "Run directory, seed, logging.")
    model: ModelConfig = section(lambda: ModelConfig(path="runs/sft/final"), "The policy to train (the SFT model).")
    adapter: AdapterConfig = section(AdapterConfig, "Full fine-tuning, LoRA or prefix-tuning.")
    data: DataConfig = section(lambda: DataConfig(source="arith", size=20_000, max_length=256),
                               "Preference pairs, or rankings (Plackett–Luce DPO).")
    optim: OptimConfig = section(lambda: OptimConfig(lr=1e-5, warmup_steps=10), "Optimizer and schedule.")
    train: TrainConfig = section(lambda: TrainConfig(max_steps=200, batch_size=32, micro_batch_size=32),
                                 "Loop length, batch size (comparisons per step), checkpoints.")
    loss: DPOLossConfig = section(DPOLossConfig, "The DPO loss.")
    reference: ReferenceConfig = section(ReferenceConfig, "The reference policy.")
    pairs: PairsConfig = section(PairsConfig, "Where the pairs come from: the data, or samples of the policy.")
    sampling: SamplingConfig = section(lambda: SamplingConfig(samples_per_prompt=8, max_new_tokens=24),
                                       "On-policy pairs: how completions are sampled.")
    reward: RewardConfig = section(RewardConfig, "On-policy pairs: what ranks the completions of a prompt.")
    eval: EvalConfig = section(EvalConfig, "Held-out evaluation: the DPO loss, reward accuracy and margins on held-out "
                                           "pairs (eval.source or data.eval_split; on-policy: the rewards of greedy "
                                           "completions of held-out prompts), exact match on a built-in task.")
    eval_before: bool = param(True, "Also evaluate the starting model, to report the gain.")


@stage_main(DPOConfig)
def main(cfg: DPOConfig) -> RunResult:
    if not cfg.model.path:
        raise ConfigError("DPO trains an existing model: set model.path (e.g. runs/sft/final)", field="model.path")
    on_policy = cfg.pairs.source == "on_policy"
    check_dpo_config(cfg)
    tokenizer, model = load_tokenizer_and_model(cfg.model)
    cfg = batches_for(cfg, model)
    progress = RunProgress.for_run(cfg.run)
    # On-policy: the data holds prompts (never collated); data.batch_mode is the layout of the pairs.
    data = dataclasses.replace(cfg.data, batch_mode="padded") if on_policy else cfg.data
    prepared = prepare_data(data, tokenizer, accepts=STAGE_FORMATS["grpo" if on_policy else "dpo"],
                            mask_dtype=model.dtype, bars=progress.library_bars())
    if prepared.format == "ranking" and cfg.loss.kind != "sigmoid":
        raise ConfigError(f"rankings are trained with the Plackett–Luce form of the sigmoid loss, not "
                          f"{cfg.loss.kind!r}", field="loss.kind")
    if prepared.format == "ranking" and cfg.loss.label_smoothing:
        raise ConfigError("the Plackett–Luce loss of rankings has no label smoothing: set loss.label_smoothing=0 "
                          "(or give pairs)", field="loss.label_smoothing")
    check_pair_columns(prepared, cfg.loss)
    rows = heldout.prepare_heldout(data, cfg.eval, tokenizer, prepared.format, model.dtype, progress)
    rewards = None
    if on_policy:  # checked before the run directory is written
        check_gold_answers(prepared.dataset, prepared.tokenized.name, cfg)
        rewards = build_rewards(cfg.reward, resolve_task(cfg), prepared.dataset, cfg.eval)
    run_dir = prepare_run_dir(cfg.run, cfg, stage="dpo", model=model)
    if rewards is not None:
        rewards = log_reward_errors(rewards, cfg.reward, run_dir.path)
    with forward_precision(cfg.train, model):
        evaluation = heldout.Evaluation(heldout.accuracy_part(tokenizer, cfg.data, cfg.eval) + heldout_parts(
            cfg, rows, tokenizer, model, rewards, progress), run_dir.samples, progress)
        before = evaluation.run(model, 0) if cfg.eval_before and evaluation else None
    average = token_average(cfg.loss)
    precompute_start = time.perf_counter()
    if on_policy:
        source = on_policy_source(cfg, prepared, tokenizer, model, rewards, progress)
        model, reference = source.policy, None
    else:
        model, source, reference = offline_comparisons(model, prepared, cfg.reference, cfg.model, cfg.adapter,
                                                       cfg.train, cfg.run.seed, average, progress)
    precompute_seconds = time.perf_counter() - precompute_start
    trainer = Trainer(stage="dpo", cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim, run_dir=run_dir,
                      model=model, tokenizer=tokenizer, progress=progress)
    result = trainer.fit(source, dpo_loss_fn(cfg.loss, reference), evaluation.evaluator(model),
                         progress_keys=("loss", "reward_accuracy", "eval_loss", "eval_accuracy"))

    final_dir = save_trained(model, tokenizer, run_dir.final, cfg.adapter, turn_end_ids(tokenizer))
    last = result.last
    pairs = {"pairs": cfg.pairs.source, **({"rounds": source.rounds, "pairs_per_prompt": last.get("pairs_per_prompt"),
                                              "sampled_reward": last.get("sampled_reward")} if on_policy else {})}
    summary = {"format": prepared.format, **pairs, "loss_kind": cfg.loss.kind, "beta": cfg.loss.beta,
               "trainable_parameters": count_parameters(model, trainable_only=True), **result.totals(),
               "reference_seconds": precompute_seconds,
               "final_loss": last.get("loss"),
               **{k: last.get(k) for k in ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")},
               **heldout.summary(before, last, cfg.eval, cfg.data, rows), "data": prepared.tokenized.stats.as_dict()}
    write_training_report(run_dir, f"DPO on {cfg.data.source}", summary)
    return RunResult(run_dir=run_dir.path, final_dir=final_dir, summary=summary)


def check_pair_columns(prepared: Prepared, loss: DPOLossConfig) -> None:
    """Soft labels (`preference_prob`, the share of annotators who prefer the chosen answer) are trained by the
    sigmoid loss (a label-smoothing of 1 - p for the row); the other kinds have no soft form: refused. A `margin`
    column is the reward model's (rm): DPO does not read it, said once."""
    if prepared.format != "preference":
        return
    soft = [p for p in column_values(prepared.dataset, "preference_prob") if p is not None and p != 1]
    if soft and loss.kind != "sigmoid":
        raise ConfigError(f"the data's preference_prob (soft labels) is trained by the sigmoid loss only, not "
                          f"{loss.kind!r}", field="loss.kind")
    if any(m is not None for m in column_values(prepared.dataset, "margin")):
        logger.warning("%s: DPO does not read the `margin` column (the reward model's margin loss does: posttrain "
                       "rm)", prepared.tokenized.name)


def check_dpo_config(cfg: DPOConfig) -> None:
    if cfg.pairs.source != "on_policy":
        return
    check_sampling(cfg.sampling)
    if cfg.sampling.samples_per_prompt < 2:
        raise ConfigError("on-policy pairs compare the completions of a prompt: set sampling.samples_per_prompt >= 2",
                          field="sampling.samples_per_prompt")
    if not cfg.reference.precompute:
        raise ConfigError("on-policy pairs precompute the reference logprobs of every round: keep "
                          "reference.precompute=true", field="reference.precompute")
    every = cfg.pairs.resample_every
    if every and cfg.train.save_every % every:
        # A checkpoint holds no pairs: one taken inside a round would resume with fresh ones.
        raise ConfigError(f"train.save_every ({cfg.train.save_every}) must be a multiple of pairs.resample_every "
                          f"({every}) (or 0), so that checkpoints fall between rounds", field="train.save_every")
    check_reward_functions(cfg.reward)


def heldout_parts(cfg: DPOConfig, rows: Prepared | None, tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module,
                  rewards: WeightedRewards | None, progress: RunProgress) -> list[heldout.Part]:
    """DPO's own held-out evaluation: offline, the DPO loss and its statistics (reward accuracy, margins) on the
    held-out comparisons, against the reference's logprobs computed now as training's are, by reference.path or
    the starting `model`; on-policy, the rewards of greedy completions of the held-out prompts."""
    if rows is None:
        return []
    if rewards is not None:
        return heldout_reward_part(cfg, tokenizer, rows, rewards)
    reference = load_reference(cfg.reference, cfg.model) or Reference(model)
    cached = precompute_sequence_logprobs(reference, rows, cfg.reference.batch_size, token_average(cfg.loss),
                                          progress)
    return heldout.loss_part(rows, cached_step_source(rows, cfg.train, cfg.run.seed, cached),
                             dpo_loss_fn(cfg.loss, None), cfg.train.micro_batch_size)


def on_policy_source(cfg: DPOConfig, prepared: Prepared, tokenizer: PreTrainedTokenizerBase,
                     model: torch.nn.Module, rewards: WeightedRewards,
                     progress: RunProgress | None = None) -> OnPolicyPairs:
    """The pair source of `pairs.source=on_policy`, its first round sampled from the starting model. The reference
    is `reference.path`, else the starting model: the policy itself while nothing has trained it (one round before
    training), its adapter-disabled self with an adapter, or a frozen copy when later rounds sample."""
    reference = load_reference(cfg.reference, cfg.model)
    if reference is None and cfg.pairs.resample_every and cfg.adapter.method == "none":
        reference = Reference.frozen_copy(model)
    policy = apply_adapter(model, cfg.adapter)
    if reference is None:
        reference = Reference(policy, adapter_disabled=cfg.adapter.method != "none")
    engine = make_engine(cfg.sampling.engine, policy, tokenizer)
    with forward_precision(cfg.train, policy):
        return OnPolicyPairs(cfg, prepared, tokenizer, policy, engine, reference, rewards, progress)


class OnPolicyPairs:
    """DPO's step source on pairs of the policy's own samples, one round at a time (`pairs.resample_every`).

    A round samples `sampling.samples_per_prompt` completions of `pairs.prompts_per_round` prompts, scores them
    (`reward`), pairs each prompt's best with its worst (`algos.best_worst_pairs`), tokenises the pairs as
    preference rows, precomputes their reference logprobs and serves shuffled steps of them until the next round.
    The state is the prompt stream's position and the step count; a resumed run samples a fresh round (checkpoints
    fall between rounds, so it is the round the uninterrupted run sampled). With one round for the whole run
    (`pairs.resample_every=0`) checkpoints may fall anywhere: the resumed run rebuilds that round from the starting
    model, as the first process did, and goes on from the position in it that the state holds.
    """

    samples_from_policy = True  # the Trainer gathers FSDP-sharded weights around `next_step`

    def __init__(self, cfg: DPOConfig, prepared: Prepared, tokenizer: PreTrainedTokenizerBase,
                 policy: torch.nn.Module, engine: RolloutEngine, reference: Reference,
                 rewards: WeightedRewards, progress: RunProgress | None = None) -> None:
        self.cfg, self.tokenizer, self.policy, self.engine = cfg, tokenizer, policy, engine
        self.reference, self.rewards = reference, rewards
        self.progress = progress or RunProgress(enabled=False)
        self.prompts = PromptStream(prepared.dataset, cfg.pairs.prompts_per_round, cfg.run.seed, prepared.source,
                                    cfg.sampling.max_sequences)
        self.params = cfg.sampling.params()
        # the user's file's column renames and row limit are not the generated rows' (they failed or dropped pairs)
        self.pair_data = dataclasses.replace(cfg.data, source="<on-policy pairs>", format="auto", truncation="drop",
                                             eval_split=0.0, columns=ColumnsConfig(), limit=0)
        self.steps, self.rounds = 0, 0
        self.round_start = self.prompts.state_dict()  # the prompt stream before the current round sampled
        self.source, self.metrics = self._round()

    def steps_left_in_round(self) -> int:
        """The steps still to train on this round's pairs (a stop waits for them: see
        `RLStepSource.steps_left_in_round`)."""
        every = self.cfg.pairs.resample_every
        return (every - self.steps % every) % every if every and self.source is not None else 0

    def next_step(self) -> StepBatch:
        every = self.cfg.pairs.resample_every
        if self.source is None or (every and self.steps and self.steps % every == 0):
            self.round_start = self.prompts.state_dict()
            self.source, self.metrics = self._round()
        self.steps += 1
        step = self.source.next_step()
        return dataclasses.replace(step, metrics={**step.metrics, **self.metrics})

    def state_dict(self) -> dict[str, Any]:
        state = {**self.prompts.state_dict(), "steps": self.steps, "pair_rounds": self.rounds,
                 "round_start": self.round_start}
        if not self.cfg.pairs.resample_every:
            state["pair_position"] = self.source.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict(state)
        self.steps, self.rounds = state["steps"], state["pair_rounds"]
        every = self.cfg.pairs.resample_every
        if every and self.steps % every and "round_start" in state:
            # A signal's checkpoint inside a round (it holds no pairs): that round is sampled again, from its own
            # prompts and the checkpoint's model, for its remaining steps; later rounds fall where they did.
            self.prompts.load_state_dict(state["round_start"])
            self.rounds -= 1
        if every:
            self.source = None  # the next step samples the round the uninterrupted run sampled there
        elif "pair_position" in state:  # the one round, rebuilt from the starting model: where the run was in it
            self.source.load_state_dict(state["pair_position"])

    @torch.no_grad()
    def _round(self) -> tuple[ShuffledStepSource, dict[str, float]]:
        reward_errors_of_step(self.rewards, self.steps + 1)
        with self.progress.phase(f"sampling round {self.rounds + 1}: prompts", self.prompts.per_round) as bar:
            rows, rollout = self.prompts.sample(self.engine, self.params, bar.advance)  # (in eval mode)
        completions = completions_of(rollout, rows)
        scores = self.rewards(completions)
        check_reward_errors(self.rewards)
        # Every rank sampled its share of the round's prompts; each trains its slice of the steps over all the
        # pairs (`ShuffledStepSource`), so every rank holds all of them, in the order one process would have made them.
        # A completion cut at max_new_tokens is no answer the policy gave: as a row its text would end with the
        # end-of-turn token the policy never sampled (DPO would teach it to stop mid-answer).
        pairs = dist.all_gather_list(preference_rows(completions, scores, rollout.prompt_index,
                                                     self.cfg.pairs.min_margin,
                                                     finished=~rollout.truncated if self.cfg.pairs.finished_only
                                                     else None))
        if not pairs:
            raise DataError(f"round {self.rounds + 1}: no prompt's completions differ in reward by more than "
                            f"pairs.min_margin={self.cfg.pairs.min_margin}, so there is no pair to train on "
                            "(a harder or easier prompt set, more samples_per_prompt, or offline pairs)",
                            field="pairs.source")
        prepared = prepare_data(self.pair_data, self.tokenizer, accepts=("preference",), rows=pairs,
                                mask_dtype=floating_dtype(self.policy))
        cached = precompute_sequence_logprobs(self.reference, prepared, self.cfg.reference.batch_size,
                                              token_average(self.cfg.loss), self.progress)
        self.rounds += 1
        prompts = len(rows) * dist.context().world_size
        metrics = {"pairs_per_prompt": len(prepared.dataset) / prompts, "sampled_reward": scores.total.mean().item(),
                   "pair_round": float(self.rounds)}
        return cached_step_source(prepared, self.cfg.train, self.cfg.run.seed + self.rounds, cached), metrics


def token_average(loss: DPOLossConfig) -> bool:
    """Whether h compares per-token average logprobs (IPO) rather than sequence sums."""
    return loss.kind == "ipo"


def dpo_loss_fn(cfg: DPOLossConfig, reference: Reference | None):
    """The DPO loss of a micro-batch of pairs or rankings, scaled to its share of the step's comparisons."""
    average = token_average(cfg)

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any], normaliser: float) -> tuple[torch.Tensor, dict]:
        logprobs, mask = response_logprobs(model, batch)  # one forward: every response of every comparison
        totals = per_sequence_sums(logprobs, mask, batch)
        per_token = totals / per_sequence_sums(mask, mask, batch).clamp(min=1)
        policy, present = comparison_matrix(per_token if average else totals, batch)  # [B, K]
        ref_values = batch["ref_logprobs"] if "ref_logprobs" in batch else reference.sequence_logprobs(batch, average)
        ref, _ = comparison_matrix(ref_values.to(policy.dtype), batch)
        levels = comparison_levels(batch, policy)  # ties share a level
        if is_ranking_batch(batch):
            out = dpo_plackett_luce_loss(policy, ref, present, cfg.beta, levels)
            loss, rewards = out.loss, out.rewards
        else:
            # soft labels (`preference_prob`) flip with 1 - p, label smoothing on top: `soft_label_flip`
            p = batch.get("preference_probs") if cfg.kind == "sigmoid" else None  # other kinds: refused (all 1)
            flip = cfg.label_smoothing if p is None else soft_label_flip(p, cfg.label_smoothing).to(policy)
            out = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], cfg.beta, cfg.kind, flip)
            loss, rewards = out.loss, torch.stack([out.chosen_rewards, out.rejected_rewards], dim=1)
        share = len(policy) / normaliser  # means over this micro-batch -> its part of the step's mean
        parts = {"dpo_loss": loss.item() * share}
        if cfg.sft_weight:  # RPO: keep the chosen answers likely (plain DPO can lower both likelihoods)
            nll = -comparison_matrix(per_token, batch)[0][:, 0].mean()
            loss = loss + cfg.sft_weight * nll
            parts["sft_loss"] = nll.item() * share  # the chosen answers' per-token NLL, unweighted
        loss = loss * share
        return loss, dpo_metrics(loss, rewards, policy.detach(), present, levels, normaliser) | parts

    return loss_fn


def dpo_metrics(loss: torch.Tensor, rewards: torch.Tensor, logprobs: torch.Tensor, present: torch.Tensor,
                levels: torch.Tensor, normaliser: float) -> dict[str, float]:
    """Sums over this micro-batch's comparisons / the step's count, so micro-batches add up to step means.
    "chosen" is the mean over a comparison's best responses, "rejected" over the others (the one rejected answer
    of a pair)."""

    def split(values: torch.Tensor) -> tuple[float, float]:
        best, others = best_and_others(values, present, levels)
        return best.sum().item() / normaliser, others.sum().item() / normaliser

    chosen_reward, rejected_reward = split(rewards)
    chosen_logprobs, rejected_logprobs = split(logprobs)
    return {"loss": loss.item(), "chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
            "reward_margin": chosen_reward - rejected_reward,
            "reward_accuracy": ordered_pair_accuracy(rewards, present, levels).sum().item() / normaliser,
            "chosen_logprobs": chosen_logprobs, "rejected_logprobs": rejected_logprobs}
