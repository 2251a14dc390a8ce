"""Kahneman–Tversky optimisation: learn from single completions labelled desirable or undesirable.

    r    = logp(y|x) - ref(y|x)                        (implied reward: sequence logprobs of the answer)
    z0   = max(0, mean over the batch of logp(y'|x) - ref(y'|x)), no gradient    (y': another row's answer)
    loss = lambda_D (1 - sigmoid(beta (r - z0)))  for a desirable row,  lambda_U (1 - sigmoid(beta (z0 - r)))  else

Where DPO needs a preferred and a dispreferred answer to the same prompt, KTO takes rows one at a time
(`{"prompt", "completion", "label"}`): a desirable answer is pushed above the reference point z0, an
undesirable one below it. z0 — the policy's KL divergence from the reference, estimated on mismatched
pairs (each row's prompt with another row's completion, fixed before training: `posttrain.data.tokenize.kl_pairs`)
— keeps the policy from gaining reward by drifting everywhere at once.

Every row travels with its mismatched pair, as DPO's chosen with its rejected: one forward (padded or
padding-free) covers both, and the reference is handled as in DPO (`posttrain.train.reference.offline_comparisons`):
its logprobs precomputed once by the starting policy, or a live frozen copy / adapter-disabled policy.
The metrics are z0 (`kl`), the implicit rewards beta * r of the desirable and undesirable rows of the step
and their margin, and the sequence logprobs; held-out exact match is measured before and after.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import torch

from posttrain.algos import kto_loss
from posttrain.config import ModelConfig, OptimConfig, RunConfig, param, section
from posttrain.data.columns import column_values
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import Prepared, prepare_data
from posttrain.data.tokenize import turn_end_ids
from posttrain.errors import ConfigError
from posttrain.eval import heldout
from posttrain.eval.accuracy import EvalConfig
from posttrain.eval.report import write_training_report
from posttrain.models import count_parameters, load_tokenizer_and_model
from posttrain.models.adapters import AdapterConfig, save_trained
from posttrain.models.likelihood import per_sequence_sums, response_logprobs
from posttrain.recipes.layout import batches_for
from posttrain.train import dist
from posttrain.train.comparisons import comparison_matrix, comparison_step_source
from posttrain.train.engine import StepBatch, StepSource, TrainConfig, Trainer, forward_precision
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

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class KTOLossConfig:
    beta: float = param(0.1, "Strength of the pull towards the reference (larger: stay closer).", gt=0)
    desirable_weight: float = param(1.0, "lambda_D, the weight of desirable rows; with unbalanced data the paper "
                                         "keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3].", gt=0)
    undesirable_weight: float = param(1.0, "lambda_U, the weight of undesirable rows.", gt=0)


@dataclasses.dataclass(frozen=True)
class KTOConfig:
    run: RunConfig = section(lambda: RunConfig(name="kto"), "Run directory, seed, logging.")
    model: ModelConfig = section(lambda: ModelConfig(path="runs/sft/final"), "The policy to train (the SFT model).")
    adapter: AdapterConfig = section(AdapterConfig, "Full fine-tuning, LoRA or prefix-tuning.")
    data: DataConfig = section(lambda: DataConfig(source="arith", size=6400, max_length=256),
                               "Unpaired rows: prompt, completion, label (true: desirable).")
    optim: OptimConfig = section(lambda: OptimConfig(lr=1e-5, warmup_steps=10), "Optimizer and schedule.")
    train: TrainConfig = section(lambda: TrainConfig(max_steps=200, batch_size=32, micro_batch_size=32),
                                 "Loop length, batch size (rows per step; z0 is estimated per micro-batch), "
                                 "checkpoints.")
    loss: KTOLossConfig = section(KTOLossConfig, "The KTO loss.")
    reference: ReferenceConfig = section(ReferenceConfig, "The reference policy.")
    eval: EvalConfig = section(EvalConfig, "Held-out evaluation: the KTO loss, z0 and rewards of held-out rows "
                                           "(eval.source or data.eval_split), exact match on a built-in task.")
    eval_before: bool = param(True, "Also evaluate the starting model, to report the gain.")


@stage_main(KTOConfig)
def main(cfg: KTOConfig) -> RunResult:
    if not cfg.model.path:
        raise ConfigError("KTO trains an existing model: set model.path (e.g. runs/sft/final)", field="model.path")
    if cfg.train.micro_batch_size < 2:
        raise ConfigError("z0 is estimated over the rows of a micro-batch: set train.micro_batch_size >= 2",
                          field="train.micro_batch_size")
    tokenizer, model = load_tokenizer_and_model(cfg.model)
    cfg = batches_for(cfg, model)
    progress = RunProgress.for_run(cfg.run)
    prepared = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS["kto"], mask_dtype=model.dtype,
                            bars=progress.library_bars())
    rows = heldout.prepare_heldout(cfg.data, cfg.eval, tokenizer, prepared.format, model.dtype, progress)
    labels = column_values(prepared.dataset, "label")
    if dist.is_main_process():
        check_label_balance(sum(labels), len(labels) - sum(labels), cfg.loss, prepared.tokenized.name)
    run_dir = prepare_run_dir(cfg.run, cfg, stage="kto", model=model)

    with forward_precision(cfg.train, model):
        evaluation = heldout.Evaluation(heldout.accuracy_part(tokenizer, cfg.data, cfg.eval) + heldout_part(
            cfg, rows, model, progress), run_dir.samples, progress)
        before = evaluation.run(model, 0) if cfg.eval_before and evaluation else None
    reference_start = time.perf_counter()
    model, source, reference = offline_comparisons(model, prepared, cfg.reference, cfg.model, cfg.adapter,
                                                   cfg.train, cfg.run.seed, progress=progress)
    reference_seconds = time.perf_counter() - reference_start
    trainer = Trainer(stage="kto", cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim, run_dir=run_dir,
                      model=model, tokenizer=tokenizer, progress=progress)
    result = trainer.fit(LabelCounts(source), kto_loss_fn(cfg.loss, reference), evaluation.evaluator(model),
                         progress_keys=("loss", "kl", "reward_margin", "eval_loss", "eval_accuracy"))

    final_dir = save_trained(model, tokenizer, run_dir.final, cfg.adapter, turn_end_ids(tokenizer))
    last = result.last
    summary = {"format": prepared.format, "rows_desirable": sum(labels), "rows_undesirable": len(labels) - sum(labels),
               "beta": cfg.loss.beta, "desirable_weight": cfg.loss.desirable_weight,
               "undesirable_weight": cfg.loss.undesirable_weight,
               "trainable_parameters": count_parameters(model, trainable_only=True), **result.totals(),
               "reference_seconds": reference_seconds, "final_loss": last.get("loss"),
               **{k: last.get(k) for k in ("kl", "desirable_reward", "undesirable_reward", "reward_margin")},
               **heldout.summary(before, last, cfg.eval, cfg.data, rows), "data": prepared.tokenized.stats.as_dict()}
    write_training_report(run_dir, f"KTO on {cfg.data.source}", summary)
    return RunResult(run_dir=run_dir.path, final_dir=final_dir, summary=summary)


def check_label_balance(desirable: int, undesirable: int, loss: KTOLossConfig, name: str) -> None:
    """Warn of rows of one label only (KTO then only pushes each row's reward past the batch's KL estimate z0, with
    no contrast between good and bad answers) and of weights that leave lambda_D n_D / (lambda_U n_U) outside the
    paper's [1, 4/3], with the weight that brings it inside."""
    if not desirable or not undesirable:
        logger.warning("%s: every row is %s: KTO then has no contrast between good and bad answers (it pushes each "
                       "row's reward %s the reference's KL estimate); give rows of both labels", name,
                       "desirable" if desirable else "undesirable", "above" if desirable else "below")
        return
    ratio = loss.desirable_weight * desirable / (loss.undesirable_weight * undesirable)
    if not 1 <= ratio <= 4 / 3:
        logger.warning("%s: %d desirable and %d undesirable rows with loss.desirable_weight=%g and "
                       "loss.undesirable_weight=%g give lambda_D n_D / (lambda_U n_U) = %.2f, outside the KTO paper's "
                       "[1, 4/3]: loss.undesirable_weight=%.3g brings it to %s", name, desirable, undesirable,
                       loss.desirable_weight, loss.undesirable_weight, ratio,
                       loss.desirable_weight * desirable / (undesirable * (1.0 if ratio < 1 else 4 / 3)),
                       "1" if ratio < 1 else "4/3")


def heldout_part(cfg: KTOConfig, rows: Prepared | None, model: torch.nn.Module,
                 progress: RunProgress) -> list[heldout.Part]:
    """KTO's loss, z0 and per-label rewards on the held-out rows (each with its mismatched pair among them), against
    the reference's logprobs computed now as training's are, by reference.path or the starting `model`; the label
    counts are the held-out set's, so that the per-label statistics add up to held-out means."""
    if rows is None:
        return []
    reference = load_reference(cfg.reference, cfg.model) or Reference(model)
    cached = cached_step_source(rows, cfg.train, cfg.run.seed,
                                precompute_sequence_logprobs(reference, rows, cfg.reference.batch_size,
                                                             progress=progress))
    desirable = sum(column_values(rows.dataset, "label"))
    counts = (desirable, len(rows.dataset) - desirable)
    source = comparison_step_source(rows, cfg.train, cfg.run.seed,
                                    collate=lambda indices: cached.collate(indices) | {"step_labels": counts})
    return heldout.loss_part(rows, source, kto_loss_fn(cfg.loss, None), cfg.train.micro_batch_size)


class LabelCounts:
    """A step source whose micro-batches also carry the step's count of desirable and undesirable rows
    (`step_labels`), so that per-label metrics of the micro-batches add up to the step's means."""

    def __init__(self, source: StepSource) -> None:
        self.source = source

    def next_step(self) -> StepBatch:
        step = self.source.next_step()
        # The counts of the whole step, over every rank's share of it, per rank: the trainer averages the ranks'
        # metrics, so each rank's sum / (count / ranks) averages to the step's mean (not the mean of rank means).
        world = dist.context().world_size
        desirable = dist.all_reduce_sum(sum(float(batch["desirable"].sum()) for batch in step.micro_batches))
        rows = dist.all_reduce_sum(float(sum(len(batch["desirable"]) for batch in step.micro_batches)))
        for batch in step.micro_batches:
            batch["step_labels"] = (desirable / world, (rows - desirable) / world)
        return step

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


def kto_loss_fn(cfg: KTOLossConfig, reference: Reference | None):
    """The KTO loss of a micro-batch of rows (each with its mismatched pair), scaled to its share of the step's rows.
    z0 is the micro-batch's estimate, as TRL's is its per-device batch's."""

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any], normaliser: float) -> tuple[torch.Tensor, dict]:
        logprobs, mask = response_logprobs(model, batch)  # one forward: every row and its mismatched pair
        policy, _ = comparison_matrix(per_sequence_sums(logprobs, mask, batch), batch)  # [B, 2]: row, pair
        ref_values = batch["ref_logprobs"] if "ref_logprobs" in batch else reference.sequence_logprobs(batch)
        ref, _ = comparison_matrix(ref_values.to(policy.dtype), batch)
        out = kto_loss(policy[:, 0], ref[:, 0], policy[:, 1], ref[:, 1], batch["desirable"], cfg.beta,
                       cfg.desirable_weight, cfg.undesirable_weight)
        share = len(policy) / normaliser  # means over this micro-batch -> its part of the step's mean
        loss = out.loss * share
        metrics = {"loss": loss.item(), "kl": out.kl.item() * share}
        return loss, metrics | label_metrics(out.rewards, policy[:, 0].detach(), batch)

    return loss_fn


def label_metrics(rewards: torch.Tensor, logprobs: torch.Tensor, batch: dict[str, Any]) -> dict[str, float]:
    """Per-label sums over this micro-batch / the step's count of that label, so micro-batches add up to step means.
    A label the step has no row of gets NaN (and so does the margin): every step logs the same metrics (a
    train.stop_when on one is checked against the first step's record), NaN written as null."""
    desirable = batch["desirable"]
    counts = batch.get("step_labels", (int(desirable.sum()), int((~desirable).sum())))
    out = {}
    for name, rows, count in (("desirable", desirable, counts[0]), ("undesirable", ~desirable, counts[1])):
        out[f"{name}_reward"] = rewards[rows].sum().item() / count if count else math.nan
        out[f"{name}_logprobs"] = logprobs[rows].sum().item() / count if count else math.nan
    out["reward_margin"] = out["desirable_reward"] - out["undesirable_reward"]
    return out
