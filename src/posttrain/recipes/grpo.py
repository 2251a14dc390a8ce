"""Group relative policy optimisation (GRPO), with outcome or process supervision.

Each generation round samples G completions for each of P prompts, scores them, and trains on
advantages measured against the other completions of the same prompt (grouped by prompt id):

    outcome:  A_i     = (r_i - mean_g r) / (std_g r + eps)       scale=group; batch: the batch std; none: Dr. GRPO
    process:  r~_ij   = (r_ij - mean R_g) / (std R_g + eps)       R_g = every step reward of the group
              A_{i,t} = sum of r~_ij over the steps j of completion i that end at or after token t
    ratio_t = exp(logp_t - old_logp_t)
    L_t     = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - clip_low, 1 + clip_high)) + beta * k3_t
    k3_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (KL to the reference; beta = 0 loads none)
    loss    = aggregate(L): token-mean (DAPO), seq-mean-token-mean (GRPO), seq-mean-token-sum-norm (Dr. GRPO)

r is the weighted sum of the configured reward functions (`posttrain.rewards.functions`). Process
supervision scores every step with the task's step verifier or a process reward model
(`posttrain.rewards.steps`), maps each step's last character to its token, and by default adds the
outcome reward as a last step ending at the final token, so stopping early is not free.

A generation batch serves `num_iterations` optimizer steps; pi_old is the policy that sampled it.
The first pass over the batch stores the policy's logprobs as old_logprobs — the ratio is exactly 1
there, at no extra forward — and compares them with the sampler's (logged as logprob_mismatch,
~1e-7 on CPU fp32: the engine and the trainer compute one distribution).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from posttrain.algos import (
    AGG_MODES,
    GROUP_SCALES,
    KL_KINDS,
    POLICY_LOSSES,
    AdvantageInputs,
    get_advantage_estimator,
    get_policy_loss,
    grpo_loss,
    masked_mean,
)
from posttrain.config import ModelConfig, OptimConfig, RunConfig, param, section
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import Prepared, prepare_data
from posttrain.data.tasks.base import Task
from posttrain.errors import ConfigError
from posttrain.eval.accuracy import EvalConfig, accuracy_evaluator, heldout_accuracy
from posttrain.eval.report import write_training_report
from posttrain.models import count_parameters, load_tokenizer_and_model
from posttrain.models.adapters import AdapterConfig, apply_adapter, save_trained
from posttrain.recipes.rl import (
    PromptStream,
    RewardConfig,
    RolloutSampling,
    accuracy_summary,
    adapter_reference,
    build_rewards,
    check_reward_functions,
    completions_of,
    padding_free_capacity_param,
    resolve_task,
    reward_metrics,
    sample_record,
)
from posttrain.recipes.rl import build_reference as shared_reference
from posttrain.rewards.functions import Completions, Scores, WeightedRewards
from posttrain.rewards.steps import Step, StepScorer, locate_steps, prm_step_scorer, verifier_step_scorer
from posttrain.rollout import Rollout, RolloutEngine, make_engine
from posttrain.rollout.recompute import policy_forward
from posttrain.run import RunResult, prepare_run_dir
from posttrain.train import dist
from posttrain.train.engine import StepBatch, TrainConfig, Trainer
from posttrain.train.metrics import append_jsonl
from posttrain.train.reference import Reference
from posttrain.train.seed import seed_everything, set_threads

OUTCOME_ESTIMATORS = {"group": "grpo", "batch": "grpo_batch_std", "none": "dr_grpo"}  # scale -> algos registry


@dataclasses.dataclass(frozen=True)
class SamplingConfig(RolloutSampling):
    group_size: int = param(8, "Completions sampled per prompt (G); train.batch_size counts completions.", ge=2)


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    supervision: str = param("outcome", "outcome: one reward per completion; process: a score per reasoning step.",
                             choices=("outcome", "process"))
    scale: str = param("group", "Outcome advantages divided by the group's reward std, the batch's, or not at "
                                "all (Dr. GRPO); process supervision always uses the group's.", choices=GROUP_SCALES)
    eps: float = param(1e-6, "Added to the std before dividing.", ge=0)
    step_scorer: str = param("verifier", "Process supervision: the task's step verifier, or a process reward "
                                         "model (prm_path).", choices=("verifier", "prm"))
    prm_path: str | None = param(None, "Process reward model directory (from `posttrain rm kind=process`).")
    outcome_step: bool = param(True, "Process supervision: the outcome reward counts as one more step, ending at "
                                     "the completion's last token.")
    skip_zero_variance: bool = param(False, "Leave out groups whose completions all get zero advantage (equal "
                                            "rewards): they add no gradient, only tokens to the normaliser.")


@dataclasses.dataclass(frozen=True)
class GRPOLossConfig:
    policy_loss: str = param("ppo", "Policy loss from the algos registry (ppo: per-token clipped ratio; gspo: "
                                    "sequence ratio).", choices=tuple(POLICY_LOSSES))
    agg: str = param("token-mean", "Loss aggregation: token-mean (DAPO), seq-mean-token-mean (GRPO), "
                                   "seq-mean-token-sum, seq-mean-token-sum-norm (Dr. GRPO).", choices=AGG_MODES)
    clip_low: float = param(0.2, "Lower clip range: the ratio is clipped at 1 - clip_low.", ge=0)
    clip_high: float | None = param(None, "Upper clip range (None: clip_low; larger: DAPO's clip-higher).", ge=0)
    beta: float = param(0.0, "KL-to-reference coefficient (0: no reference model is loaded).", ge=0)
    kl_kind: str = param("k3", "KL estimator in the loss.", choices=KL_KINDS)
    num_iterations: int = param(1, "Optimizer steps per generation batch (> 1 reuses it, with stored old "
                                   "logprobs).", ge=1)
    mask_truncated: bool = param(False, "Leave completions cut by max_new_tokens out of the loss (they still "
                                        "count in their group's baseline).")
    padding_free: bool = param(True, "Policy forward over the real tokens only (packed rows, block-diagonal "
                                     "mask) instead of the rollout's padded layout: the same logprobs, less "
                                     "compute. Prefix-tuning adapters always use the padded layout.")
    padding_free_capacity: int = padding_free_capacity_param()


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    run: RunConfig = section(lambda: RunConfig(name="grpo"), "Run directory, seed, logging.")
    model: ModelConfig = section(lambda: ModelConfig(path="runs/sft/final"), "The policy to train (the SFT model).")
    adapter: AdapterConfig = section(AdapterConfig, "Full fine-tuning, LoRA or prefix-tuning.")
    data: DataConfig = section(lambda: DataConfig(source="arith", size=20_000, max_length=256),
                               "Prompts with gold answers (verifiable rows).")
    optim: OptimConfig = section(lambda: OptimConfig(lr=1e-5, schedule="constant"), "Optimizer and schedule.")
    train: TrainConfig = section(lambda: TrainConfig(max_steps=100, batch_size=64, micro_batch_size=64),
                                 "Loop length; batch_size and micro_batch_size count completions.")
    sampling: SamplingConfig = section(SamplingConfig, "How completions are sampled.")
    reward: RewardConfig = section(RewardConfig, "What a completion is worth.")
    advantage: AdvantageConfig = section(AdvantageConfig, "Outcome or process advantages.")
    loss: GRPOLossConfig = section(GRPOLossConfig, "The clipped policy loss and the KL penalty.")
    eval: EvalConfig = section(EvalConfig, "Held-out exact-match evaluation.")
    eval_before: bool = param(True, "Also evaluate the starting model, to report the gain.")


def main(cfg: GRPOConfig) -> RunResult:
    set_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    check_config(cfg)
    if cfg.adapter.method == "prefix":  # its virtual tokens do not fit a block-diagonal mask
        cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, padding_free=False))
    tokenizer, model = load_tokenizer_and_model(cfg.model)
    prepared = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS["grpo"], mask_dtype=model.dtype)
    task = resolve_task(cfg)
    rewards = build_rewards(cfg.reward, task)
    step_scorer = build_step_scorer(cfg.advantage, task) if cfg.advantage.supervision == "process" else None
    run_dir = prepare_run_dir(cfg.run, cfg, stage="grpo")

    before = heldout_accuracy(model, tokenizer, cfg.data, cfg.eval) if cfg.eval_before else None
    reference = build_reference(cfg, model)
    model = apply_adapter(model, cfg.adapter)
    reference = adapter_reference(reference, cfg.loss.beta, model)
    source = GRPOStepSource(cfg, prepared, make_engine(cfg.sampling.engine, model, tokenizer), tokenizer, rewards,
                            task=task, step_scorer=step_scorer, reference=reference, samples=run_dir.samples)
    trainer = Trainer(stage="grpo", cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim, run_dir=run_dir,
                      model=model)
    result = trainer.fit(source, grpo_loss_fn(cfg.loss, cfg.sampling.max_new_tokens),
                         accuracy_evaluator(model, tokenizer, cfg.data, cfg.eval, run_dir.samples),
                         progress_keys=("reward", "accuracy", "eval_accuracy"))
    if result.interrupted:
        return RunResult(run_dir=run_dir.path, final_dir=None, summary={"interrupted_at_step": result.step})

    final_dir = save_trained(model, tokenizer, run_dir.final, cfg.adapter)
    last = result.last
    summary = {"supervision": cfg.advantage.supervision, "group_size": cfg.sampling.group_size,
               "trainable_parameters": count_parameters(model, trainable_only=True), "steps": result.step,
               "trained_tokens": result.tokens, "seconds": result.seconds,
               **{k: last.get(k) for k in ("reward", "accuracy", "kl", "entropy", "completion_length")},
               **accuracy_summary(before, last, cfg.eval)}
    write_training_report(run_dir, f"GRPO ({cfg.advantage.supervision} supervision) on {cfg.data.source}", summary)
    return RunResult(run_dir=run_dir.path, final_dir=final_dir, summary=summary)


def check_config(cfg: GRPOConfig) -> None:
    if not cfg.model.path:
        raise ConfigError("GRPO trains an existing model: set model.path (e.g. runs/sft/final)", field="model.path")
    if cfg.train.batch_size % cfg.sampling.group_size:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size} completions) must be a multiple of "
                          f"sampling.group_size ({cfg.sampling.group_size})", field="train.batch_size")
    if cfg.advantage.supervision == "process" and cfg.advantage.scale != "group":
        raise ConfigError("process supervision normalises over the group's steps: advantage.scale must be 'group'",
                          field="advantage.scale")
    check_reward_functions(cfg.reward)


def build_step_scorer(cfg: AdvantageConfig, task: Task | None) -> StepScorer:
    if cfg.step_scorer == "prm":
        if not cfg.prm_path:
            raise ConfigError("step_scorer=prm needs the process reward model's directory", field="advantage.prm_path")
        from posttrain.rewards import ProcessRewardScorer

        return prm_step_scorer(ProcessRewardScorer.from_pretrained(cfg.prm_path))
    if task is None:
        raise ConfigError("the step verifier comes from a built-in task: set reward.task (e.g. multistep)",
                          field="reward.task")
    try:
        return verifier_step_scorer(task)
    except ValueError as err:
        raise ConfigError(str(err), field="advantage.step_scorer") from None


def build_reference(cfg: GRPOConfig, model: torch.nn.Module) -> Reference | None:
    """A frozen copy of the starting policy when beta > 0 (with LoRA: None, the adapter-disabled policy is used)."""
    return shared_reference(cfg.loss.beta, cfg.adapter, model)


# ----------------------------------------------------------------------------------------------
# Generation, scoring and advantages: the step source.


class GRPOStepSource:
    """Samples a generation batch, scores it, computes advantages, and serves it for `num_iterations` steps.

    `train.batch_size` completions per step = batch_size / G prompts, drawn in a seeded shuffle of the
    prompts (resumable by position). Rows are reordered by length into micro-batches of
    `train.micro_batch_size`; every tensor a micro-batch carries is selected with the same row index,
    so rewards and advantages stay with their completion. A resumed run starts a fresh generation batch.

    Under torchrun each rank samples its share of the round's prompts (whole groups), the batch-level
    advantage statistics and the step normaliser are taken over all ranks, and samples.jsonl holds
    rank 0's completions.
    """

    samples_from_policy = True  # the Trainer gathers FSDP-sharded weights around `next_step`

    def __init__(self, cfg: GRPOConfig, prepared: Prepared, engine: RolloutEngine,
                 tokenizer: PreTrainedTokenizerBase, rewards: WeightedRewards, *, task: Task | None = None,
                 step_scorer: StepScorer | None = None, reference: Reference | None = None,
                 samples: Path | None = None) -> None:
        self.cfg, self.dataset, self.engine, self.tokenizer = cfg, prepared.dataset, engine, tokenizer
        self.rewards, self.task, self.step_scorer, self.reference, self.samples = (
            rewards, task, step_scorer, reference, samples)
        if cfg.advantage.skip_zero_variance and dist.context().distributed:
            # Ranks would then train different numbers of micro-batches and wait on each other forever.
            raise ConfigError("skip_zero_variance is not available with several ranks", field="advantage."
                              "skip_zero_variance")
        self.prompts = PromptStream(self.dataset, cfg.train.batch_size // cfg.sampling.group_size, cfg.run.seed)
        self.params = cfg.sampling.params(cfg.sampling.group_size)
        self.forward = policy_forward(cfg.loss.padding_free, cfg.loss.padding_free_capacity)  # as the loss's
        self.steps, self.iteration = 0, 0
        self._batch: StepBatch | None = None
        self.last_rollout: Rollout | None = None

    def next_step(self) -> StepBatch:
        if self._batch is None or self.iteration == self.cfg.loss.num_iterations:
            self._batch, self.iteration = self.generate(), 0
        self.iteration += 1
        self.steps += 1
        batch = self._batch
        if self.iteration == 1:
            return batch
        return dataclasses.replace(batch, metrics={**batch.metrics, "generation_s": 0.0, "iteration": self.iteration})

    def state_dict(self) -> dict[str, Any]:
        return {**self.prompts.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict(state)
        self.steps, self._batch = state["steps"], None

    def generate(self) -> StepBatch:
        """One generation round: sample, score, compute advantages, cut into micro-batches."""
        start = time.perf_counter()
        rows, rollout = self.prompts.sample(self.engine, self.params)
        self.last_rollout = rollout
        generation_s = time.perf_counter() - start
        completions = completions_of(rollout, rows)
        scores = self.rewards(completions)
        steps = self.step_scorer(completions) if self.step_scorer is not None else None
        inputs = advantage_inputs(rollout, scores.total, steps, self.tokenizer, self.cfg.advantage.outcome_step)
        estimator = "grpo_process" if steps is not None else OUTCOME_ESTIMATORS[self.cfg.advantage.scale]
        advantages = get_advantage_estimator(estimator)(inputs, gamma=1.0, lam=1.0,
                                                        eps=self.cfg.advantage.eps).advantages
        if steps is None and dist.context().distributed:  # scale=batch: the std of every rank's rewards
            per_completion = dist.outcome_advantages(scores.total, inputs.group_ids, self.cfg.advantage.scale,
                                                     self.cfg.advantage.eps)
            advantages = per_completion.to(advantages.dtype).unsqueeze(1) * inputs.response_mask.to(advantages.dtype)
        loss_mask = rollout.response_mask.to(advantages.dtype)
        if self.cfg.loss.mask_truncated:
            loss_mask = loss_mask * (~rollout.truncated).unsqueeze(1).to(loss_mask.dtype)
        zero_groups = zero_advantage_groups(advantages, inputs.group_ids)
        keep = ~zero_groups if self.cfg.advantage.skip_zero_variance else torch.ones_like(zero_groups)
        self._write_samples(rollout, completions, scores, advantages, steps)
        metrics = self._metrics(rollout, completions, scores, steps, zero_groups)
        micro_batches, normaliser, tokens = self._micro_batches(rollout, advantages, loss_mask, scores.total, keep)
        metrics.update(generation_s=generation_s, scoring_s=time.perf_counter() - start - generation_s)
        return StepBatch(micro_batches=micro_batches, normaliser=normaliser, tokens=tokens, metrics=metrics)

    def _micro_batches(self, rollout: Rollout, advantages: Tensor, loss_mask: Tensor, rewards: Tensor,
                       keep: Tensor) -> tuple[list[dict[str, Any]], float, int]:
        # Rows of similar length share a micro-batch, so each pads to its own longest row: the gradient is
        # the same for any grouping (the normaliser is the step's), the padded compute is not.
        kept = keep.nonzero().flatten()
        lengths = rollout.prompt_mask.sum(dim=1) + rollout.response_mask.sum(dim=1)
        order = kept[torch.sort(lengths[kept], descending=True, stable=True).indices]
        # Step totals over all ranks; a rank's token shares are relative to the mean rank's tokens, so the
        # Trainer's average of the ranks' share-weighted statistics is the global token mean.
        token_total = dist.all_reduce_sum(float(loss_mask[kept].sum()))
        kept_total = dist.all_reduce_sum(float(len(kept)))
        normaliser = (token_total or 1.0) if self.cfg.loss.agg == "token-mean" else max(kept_total, 1.0)
        world = dist.context().world_size
        size, batches = self.cfg.train.micro_batch_size, []
        # A round where every group is skipped trains nothing: no micro-batches, so the step only advances.
        for rows in order.split(size) if len(order) else ():
            sub = rollout.select(rows)
            width = sub.completion_ids.shape[1]
            mask = loss_mask[rows, :width]
            batches.append({
                "rollout": sub, "advantages": advantages[rows, :width].to(torch.float32), "loss_mask": mask,
                "rewards": rewards[rows], "group_ids": rollout.prompt_index[rows], "rows": rows,
                "ref_logprobs": (self.reference.rollout_logprobs(sub, self.forward) if self.reference is not None
                                 else None),
                "old_logprobs": None,
                "token_share": float(mask.sum()) * world / token_total if token_total else 0.0})
        tokens = int(dist.all_reduce_sum(float(rollout.prompt_mask[kept].sum() + rollout.response_mask[kept].sum())))
        return batches, normaliser, tokens

    def _metrics(self, rollout: Rollout, completions: Completions, scores: Scores, steps: list[list[Step]] | None,
                 zero_groups: Tensor) -> dict[str, float]:
        metrics = {**reward_metrics(rollout, completions, scores, self.task),
                   "zero_variance_groups": zero_groups.float().mean().item()}
        if steps is not None:
            scored = [s.score for row in steps for s in row]
            metrics["step_score"] = sum(scored) / len(scored) if scored else 0.0
            metrics["steps_found"] = len(scored) / len(steps)
        return metrics

    def _write_samples(self, rollout: Rollout, completions: Completions, scores: Scores, advantages: Tensor,
                       steps: list[list[Step]] | None) -> None:
        if self.samples is None:
            return
        records = []
        for i in range(len(completions)):
            record = {**sample_record(self.steps + 1, i, rollout, completions, scores),
                      "advantage": advantages[i, 0].item()}
            if steps is not None:
                record["step_scores"] = [s.score for s in steps[i]]
            records.append(record)
        append_jsonl(self.samples, records)


def advantage_inputs(rollout: Rollout, rewards: Tensor, steps: list[list[Step]] | None,
                     tokenizer: PreTrainedTokenizerBase, outcome_step: bool = True) -> AdvantageInputs:
    """The estimator's inputs: the outcome reward at each completion's last token, the prompt ids as groups,
    and, for process supervision, the step rewards [B, S] with the token index where each step ends."""
    mask = rollout.response_mask
    last = (rollout.completion_lengths - 1).clamp(min=0)
    token_rewards = torch.zeros(mask.shape, dtype=torch.float64)
    token_rewards[torch.arange(len(last)), last] = rewards.to(torch.float64)
    token_rewards = token_rewards * mask
    if steps is None:
        return AdvantageInputs(rewards=token_rewards, response_mask=mask, group_ids=rollout.prompt_index)
    rows = []
    for i, row in enumerate(steps):
        length = int(rollout.completion_lengths[i])
        ends = locate_steps(tokenizer, rollout.completion_ids[i, :length].tolist(), [s.char_end for s in row])
        pairs = [(s.score, end) for s, end in zip(row, ends, strict=True)]
        rows.append(pairs + [(float(rewards[i]), length - 1)] if outcome_step else pairs)
    width = max(1, max(len(r) for r in rows))
    step_rewards = torch.zeros(len(rows), width, dtype=torch.float64)
    step_ends = torch.zeros(len(rows), width, dtype=torch.long)
    step_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, pairs in enumerate(rows):
        for j, (score, end) in enumerate(pairs):
            step_rewards[i, j], step_ends[i, j], step_mask[i, j] = score, end, True
    return AdvantageInputs(rewards=token_rewards, response_mask=mask, group_ids=rollout.prompt_index,
                           step_rewards=step_rewards, step_mask=step_mask, step_ends=step_ends)


def zero_advantage_groups(advantages: Tensor, group_ids: Tensor) -> Tensor:
    """[B] True for the completions of groups in which every advantage is exactly 0 (equal rewards)."""
    nonzero = (advantages != 0).any(dim=1)
    out = torch.ones_like(nonzero)
    for group in torch.unique(group_ids):
        members = group_ids == group
        out[members] = not bool(nonzero[members].any())
    return out


# ----------------------------------------------------------------------------------------------
# The loss.


def grpo_loss_fn(cfg: GRPOLossConfig, max_new_tokens: int):
    """The GRPO loss of a micro-batch, already divided by the step's normaliser (tokens or completions).

    Statistics are token means over the micro-batch weighted by its share of the step's trained
    tokens, so the Trainer's sum over micro-batches is the step's token mean.
    """
    pg_loss_fn = get_policy_loss(cfg.policy_loss)
    forward = policy_forward(cfg.padding_free, cfg.padding_free_capacity)

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any], normaliser: float) -> tuple[Tensor, dict[str, float]]:
        rollout, mask, share = batch["rollout"], batch["loss_mask"], batch["token_share"]
        logprobs, entropy = forward(model, rollout)
        first = batch["old_logprobs"] is None
        if first:  # pi_old is the policy that sampled: the policy before this batch's first update
            batch["old_logprobs"] = logprobs.detach()
        out = grpo_loss(logprobs, batch["old_logprobs"], batch["ref_logprobs"], batch["advantages"], mask,
                        beta=cfg.beta, kl_kind=cfg.kl_kind, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                        agg=cfg.agg, normaliser=normaliser, max_length=max_new_tokens, pg_loss_fn=pg_loss_fn)
        ratio = torch.exp(logprobs.detach() - batch["old_logprobs"])
        metrics = {"loss": out.loss.item(), "pg_loss": out.pg_loss.item(),
                   "clip_fraction": out.clip_fraction.item() * share, "approx_kl": out.approx_kl.item() * share,
                   "ratio": masked_mean(ratio, mask).item() * share,
                   "entropy": masked_mean(entropy, mask).item() * share}
        if batch["ref_logprobs"] is not None:
            metrics["kl"] = out.kl.item() * share
        if first:
            mismatch = (rollout.logprobs - batch["old_logprobs"]).abs()
            metrics["logprob_mismatch"] = masked_mean(mismatch, mask).item() * share
        return out.loss, metrics

    return loss_fn
