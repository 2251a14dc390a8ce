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
import time
from typing import Any

import torch

from posttrain.algos import DPO_KINDS, dpo_loss, dpo_plackett_luce_loss
from posttrain.config import ModelConfig, OptimConfig, RunConfig, param, section
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import Prepared, prepare_data
from posttrain.errors import ConfigError
from posttrain.eval.accuracy import EvalConfig, accuracy_evaluator, heldout_accuracy
from posttrain.eval.report import write_training_report
from posttrain.models import count_parameters, load_causal_lm, load_tokenizer_and_model
from posttrain.models.adapters import AdapterConfig, apply_adapter, save_trained
from posttrain.train.comparisons import (
    comparison_matrix,
    comparison_step_source,
    is_ranking_batch,
    join_rows,
    ordered_pair_accuracy,
)
from posttrain.train.engine import TrainConfig, Trainer, forward_precision
from posttrain.train.forward import per_sequence_sums, response_logprobs
from posttrain.train.reference import Reference, precompute_sequence_logprobs
from posttrain.train.run_dir import RunResult, prepare_run_dir
from posttrain.train.seed import seed_everything, set_threads
from posttrain.train.sources import ShuffledStepSource


@dataclasses.dataclass(frozen=True)
class DPOLossConfig:
    kind: str = param("sigmoid", "sigmoid (DPO), ipo, hinge (SLiC) or robust (rDPO); rankings use the "
                                 "Plackett–Luce form of sigmoid.", choices=DPO_KINDS)
    beta: float = param(0.1, "Strength of the pull towards the reference (larger: stay closer).", gt=0)
    label_smoothing: float = param(0.0, "Assumed probability that a pair's label is flipped (cDPO for sigmoid, "
                                        "rDPO for robust).", ge=0, lt=0.5)
    sft_weight: float = param(0.0, "Weight of an added length-normalised NLL of the chosen answer (RPO; 0: off).",
                              ge=0)


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    path: str | None = param(None, "Reference model directory (None: the starting model; with LoRA, the policy "
                                   "with its adapter disabled).")
    precompute: bool = param(True, "Compute the reference logprobs of every row once before training and free "
                                   "the reference (off: one reference forward per micro-batch).")
    batch_size: int = param(32, "Rows per forward when precomputing.", ge=1)


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
    eval: EvalConfig = section(EvalConfig, "Held-out exact-match evaluation.")
    eval_before: bool = param(True, "Also evaluate the starting model, to report the gain.")


def main(cfg: DPOConfig) -> RunResult:
    set_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    if not cfg.model.path:
        raise ConfigError("DPO trains an existing model: set model.path (e.g. runs/sft/final)", field="model.path")
    tokenizer, model = load_tokenizer_and_model(cfg.model)
    prepared = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS["dpo"], mask_dtype=model.dtype)
    if prepared.format == "ranking" and cfg.loss.kind != "sigmoid":
        raise ConfigError(f"rankings are trained with the Plackett–Luce form of the sigmoid loss, not "
                          f"{cfg.loss.kind!r}", field="loss.kind")
    run_dir = prepare_run_dir(cfg.run, cfg, stage="dpo")

    with forward_precision(cfg.train, model):
        before = heldout_accuracy(model, tokenizer, cfg.data, cfg.eval) if cfg.eval_before else None
    average = cfg.loss.kind == "ipo"  # IPO's h is on per-token average logprobs
    precompute_start = time.perf_counter()
    if cfg.reference.precompute:
        # Before its first update the policy *is* the reference, so no copy is made (a resumed run
        # recomputes the cache here, from the starting model, before its checkpoint is loaded).
        reference = load_reference(cfg) or Reference(model)
        with forward_precision(cfg.train, model):
            cached = precompute_sequence_logprobs(reference, prepared, cfg.reference.batch_size, average)
        model = apply_adapter(model, cfg.adapter)
        source, reference = cached_step_source(prepared, cfg.train, cfg.run.seed, cached), None
    else:
        reference = load_reference(cfg)
        if reference is None and cfg.adapter.method == "none":
            reference = Reference.frozen_copy(model)
        model = apply_adapter(model, cfg.adapter)
        reference = reference or Reference(model, adapter_disabled=True)  # LoRA: the base weights, no copy
        source = comparison_step_source(prepared, cfg.train, cfg.run.seed)
    precompute_seconds = time.perf_counter() - precompute_start
    trainer = Trainer(stage="dpo", cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim, run_dir=run_dir,
                      model=model)
    result = trainer.fit(source, dpo_loss_fn(cfg.loss, reference),
                         accuracy_evaluator(model, tokenizer, cfg.data, cfg.eval, run_dir.samples),
                         progress_keys=("loss", "reward_accuracy", "eval_accuracy"))
    if result.interrupted:
        return RunResult(run_dir=run_dir.path, final_dir=None, summary={"interrupted_at_step": result.step})

    final_dir = save_trained(model, tokenizer, run_dir.final, cfg.adapter)
    last = result.last
    summary = {"format": prepared.format, "loss_kind": cfg.loss.kind, "beta": cfg.loss.beta,
               "trainable_parameters": count_parameters(model, trainable_only=True), **result.totals(),
               "reference_seconds": precompute_seconds,
               "final_loss": last.get("loss"),
               **{k: last.get(k) for k in ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")},
               **({"accuracy_before": before.accuracy} if before else {}),
               "accuracy": last.get("eval_accuracy"),
               "accuracy_ci": [last.get("eval_accuracy_ci_low"), last.get("eval_accuracy_ci_high")],
               "eval_problems": cfg.eval.problems, "data": prepared.tokenized.stats.as_dict()}
    write_training_report(run_dir, f"DPO on {cfg.data.source}", summary)
    return RunResult(run_dir=run_dir.path, final_dir=final_dir, summary=summary)


def load_reference(cfg: DPOConfig) -> Reference | None:
    """The frozen reference at `reference.path`, or None (the starting policy is the reference)."""
    if not cfg.reference.path:
        return None
    return Reference(load_causal_lm(cfg.reference.path, trust_remote_code=cfg.model.trust_remote_code,
                                    dtype=cfg.model.dtype).eval().requires_grad_(False))


def cached_step_source(prepared: Prepared, train: TrainConfig, seed: int,
                       cached: list[torch.Tensor]) -> ShuffledStepSource:
    """Comparison steps whose micro-batches carry the precomputed reference logprobs as `ref_logprobs` [N]."""
    dataset, ranking = prepared.dataset, prepared.format == "ranking"

    def collate(indices: list[int]) -> dict[str, Any]:
        batch = prepared.collator([dataset[i] for i in indices])
        batch["ref_logprobs"] = join_rows([cached[i] for i in indices], ranking)
        return batch

    return comparison_step_source(prepared, train, seed, collate=collate)


def dpo_loss_fn(cfg: DPOLossConfig, reference: Reference | None):
    """The DPO loss of a micro-batch of pairs or rankings, scaled to its share of the step's comparisons."""
    average = cfg.kind == "ipo"

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any], normaliser: float) -> tuple[torch.Tensor, dict]:
        logprobs, mask = response_logprobs(model, batch)  # one forward: every response of every comparison
        totals = per_sequence_sums(logprobs, mask, batch)
        per_token = totals / per_sequence_sums(mask, mask, batch).clamp(min=1)
        policy, present = comparison_matrix(per_token if average else totals, batch)  # [B, K]
        ref_values = batch["ref_logprobs"] if "ref_logprobs" in batch else reference.sequence_logprobs(batch, average)
        ref, _ = comparison_matrix(ref_values.to(policy.dtype), batch)
        if is_ranking_batch(batch):
            out = dpo_plackett_luce_loss(policy, ref, present, cfg.beta)
            loss, rewards = out.loss, out.rewards
        else:
            out = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], cfg.beta, cfg.kind, cfg.label_smoothing)
            loss, rewards = out.loss, torch.stack([out.chosen_rewards, out.rejected_rewards], dim=1)
        if cfg.sft_weight:  # RPO: keep the chosen answers likely (plain DPO can lower both likelihoods)
            loss = loss - cfg.sft_weight * comparison_matrix(per_token, batch)[0][:, 0].mean()
        loss = loss * (len(policy) / normaliser)  # means over this micro-batch -> its part of the step's mean
        return loss, dpo_metrics(loss, rewards, policy.detach(), present, normaliser)

    return loss_fn


def dpo_metrics(loss: torch.Tensor, rewards: torch.Tensor, logprobs: torch.Tensor, present: torch.Tensor,
                normaliser: float) -> dict[str, float]:
    """Sums over this micro-batch's comparisons / the step's count, so micro-batches add up to step means.
    "rejected" is the mean over a comparison's other responses (the one rejected answer of a pair)."""
    others = present[:, 1:].to(rewards.dtype)
    count = others.sum(-1)

    def split(values: torch.Tensor) -> tuple[float, float]:
        return (values[:, 0].sum().item() / normaliser,
                ((values[:, 1:] * others).sum(-1) / count).sum().item() / normaliser)

    chosen_reward, rejected_reward = split(rewards)
    chosen_logprobs, rejected_logprobs = split(logprobs)
    return {"loss": loss.item(), "chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
            "reward_margin": chosen_reward - rejected_reward,
            "reward_accuracy": ordered_pair_accuracy(rewards, present).sum().item() / normaliser,
            "chosen_logprobs": chosen_logprobs, "rejected_logprobs": rejected_logprobs}
