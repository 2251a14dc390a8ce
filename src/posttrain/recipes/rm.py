"""Reward modelling: a scalar score per response, trained on comparisons (or, kind=process, per step).

    pairs:     loss = -log sigmoid(r_chosen - r_rejected - margin)          (Bradley–Terry)
    soft:      loss = BCE(sigmoid(r_chosen - r_rejected), preference_prob)  (several labelers' verdict)
    rankings:  loss = -sum_k [r_k - logsumexp_{j >= k} r_j]                 (Plackett–Luce, ragged K)
    + center_rewards * (sum of a comparison's rewards)^2                     (optional: pins the free offset)
    process:   loss = BCE(sigmoid(r_step), label) or (r_step - label)^2, read at each step's separator

The model is the SFT checkpoint's trunk with a scalar head (`posttrain.models.reward`), scored at
the last real token; every response of a micro-batch goes through one forward. Full training by
default; `freeze_backbone` trains the head only, LoRA trains adapters plus the head. Losses are
means over comparisons (steps for a process model) scaled to the whole step's count, so
micro-batching does not change the gradient. The held-out evaluation — pairwise accuracy, margin and
reward distribution, or step accuracy and first-error detection — runs on problems training never
saw. The final model loads with `AutoModelForSequenceClassification` (MLP head: `load_reward_model`)
and scores through `posttrain.rewards.RewardModelScorer` / `ProcessRewardScorer`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from posttrain.algos import (
    PROCESS_TARGETS,
    bradley_terry_loss,
    plackett_luce_loss,
    process_reward_loss,
    reward_centering_penalty,
)
from posttrain.config import ModelConfig, OptimConfig, RunConfig, param, section
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import Prepared, prepare_data
from posttrain.errors import ConfigError
from posttrain.eval.heldout import Evaluation
from posttrain.eval.heldout import loss_part as heldout_loss_part
from posttrain.eval.report import write_training_report
from posttrain.eval.rewards import (
    RewardEvalConfig,
    comparison_metrics,
    comparison_scores,
    good_steps,
    heldout_data_config,
    plot_reward_distribution,
    process_metrics,
)
from posttrain.models import count_parameters, load_tokenizer
from posttrain.models.adapters import AdapterConfig, apply_adapter, save_trained
from posttrain.models.reward import REWARD_HEADS, build_reward_model, freeze_backbone, scores_at, sequence_scores
from posttrain.train.comparisons import (
    comparison_matrix,
    comparison_step_source,
    is_ranking_batch,
    ordered_pair_accuracy,
)
from posttrain.train.engine import TrainConfig, Trainer
from posttrain.train.progress import RunProgress
from posttrain.train.run_dir import RunResult, prepare_run_dir
from posttrain.train.seed import seed_everything, set_threads
from posttrain.train.sources import ShuffledStepSource


@dataclasses.dataclass(frozen=True)
class RMConfig:
    run: RunConfig = section(lambda: RunConfig(name="rm"), "Run directory, seed, logging.")
    model: ModelConfig = section(lambda: ModelConfig(path="runs/sft/final"),
                                 "The causal LM whose trunk the reward model starts from (the SFT model).")
    adapter: AdapterConfig = section(AdapterConfig, "Full training, or LoRA (adapters + head). Prefix-tuning is "
                                                    "not supported for reward models.")
    data: DataConfig = section(lambda: DataConfig(source="arith", size=20_000, max_length=256),
                               "Preference pairs or rankings (kind=outcome), stepwise rows (kind=process).")
    optim: OptimConfig = section(lambda: OptimConfig(lr=1e-4, warmup_steps=10), "Optimizer and schedule.")
    train: TrainConfig = section(lambda: TrainConfig(max_steps=200, batch_size=32, micro_batch_size=32),
                                 "Loop length, batch size (comparisons or chains per step), checkpoints.")
    eval: RewardEvalConfig = section(RewardEvalConfig, "Held-out evaluation.")
    kind: str = param("outcome", "outcome: one reward per response, from comparisons; process: one score per "
                                 "reasoning step, from stepwise labels.", choices=("outcome", "process"))
    head: str = param("linear", "Scalar head: linear (loads with plain transformers) or a small MLP.",
                      choices=REWARD_HEADS)
    head_width: int = param(0, "Hidden width of the MLP head (0: the trunk's hidden size).", ge=0)
    freeze_backbone: bool = param(False, "Train the head only; the trunk stays as the SFT model left it.")
    use_margin: bool = param(True, "Subtract the rows' `margin` in the pairwise loss (rows without one: 0).")
    center_rewards: float = param(0.0, "Coefficient of the reward-centering penalty (0: off; ~0.01 keeps rewards "
                                       "near 0).", ge=0)
    process_target: str = param("classification", "kind=process: per-step BCE on correct/wrong labels "
                                                   "(classification) or squared error on step values "
                                                   "(regression).", choices=PROCESS_TARGETS)


def main(cfg: RMConfig) -> RunResult:
    set_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    check_config(cfg)
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    model = build_reward_model(cfg.model.path, head=cfg.head, head_width=cfg.head_width,
                               pad_token_id=tokenizer.pad_token_id, dtype=cfg.model.dtype,
                               trust_remote_code=cfg.model.trust_remote_code, disable_dropout=cfg.model.drops_dropout())
    accepts = STAGE_FORMATS["prm" if cfg.kind == "process" else "rm"]
    progress = RunProgress.for_run(cfg.run)
    prepared = prepare_data(cfg.data, tokenizer, accepts=accepts, mask_dtype=model.dtype,
                            bars=progress.library_bars())
    heldout_cfg = heldout_data_config(cfg.data, cfg.eval)
    heldout = (prepare_data(heldout_cfg, tokenizer, accepts=(prepared.format,), mask_dtype=model.dtype,
                            heldout=heldout_cfg.eval_split > 0, bars=progress.library_bars())
               if heldout_cfg else None)
    run_dir = prepare_run_dir(cfg.run, cfg, stage="rm", model=model)

    if cfg.kind == "process":  # how ProcessRewardScorer turns head outputs into step scores
        model.config.process_target = cfg.process_target
    if cfg.freeze_backbone:
        freeze_backbone(model)
    model = apply_adapter(model, cfg.adapter, task_type="SEQ_CLS")
    trainer = Trainer(stage="rm", cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim, run_dir=run_dir,
                      model=model, progress=progress)
    steps = process_step_source if cfg.kind == "process" else comparison_step_source
    loss_fn = process_loss_fn(cfg) if cfg.kind == "process" else comparison_loss_fn(cfg)
    source = steps(prepared, cfg.train, cfg.run.seed)
    evaluate = (HeldoutEvaluator(model, heldout, cfg, steps(heldout, cfg.train, cfg.run.seed), loss_fn, progress)
                if heldout is not None else None)
    keys = ("loss", "accuracy", "eval_loss", "eval_accuracy", "eval_step_accuracy")
    result = trainer.fit(source, loss_fn, evaluate, progress_keys=keys)
    if result.interrupted:
        return RunResult(run_dir=run_dir.path, final_dir=None, summary={"interrupted_at_step": result.step})

    final_dir = save_trained(model, tokenizer, run_dir.final, cfg.adapter)
    summary = {"kind": cfg.kind, "format": prepared.format, "head": cfg.head,
               "trainable_parameters": count_parameters(model, trainable_only=True), **result.totals(),
               "final_loss": result.last.get("loss"),
               **{k: v for k, v in result.last.items() if k.startswith("eval_")},
               "eval_rows": len(heldout.dataset) if heldout else 0, "data": prepared.tokenized.stats.as_dict()}
    if evaluate is not None and evaluate.rows:
        plot_reward_distribution(evaluate.rows, run_dir.plots / "rewards.png", f"held-out rewards ({cfg.data.source})")
    write_training_report(run_dir, f"{'Process reward' if cfg.kind == 'process' else 'Reward'} model on "
                                   f"{cfg.data.source}", summary)
    return RunResult(run_dir=run_dir.path, final_dir=final_dir, summary=summary)


def check_config(cfg: RMConfig) -> None:
    if not cfg.model.path:
        raise ConfigError("a reward model starts from an existing model: set model.path (e.g. runs/sft/final)",
                          field="model.path")
    if cfg.adapter.method == "prefix":
        raise ConfigError("prefix-tuning is not supported for reward models: use none or lora",
                          field="adapter.method")
    if cfg.freeze_backbone and cfg.adapter.method != "none":
        raise ConfigError("freeze_backbone trains the head only; it cannot be combined with an adapter",
                          field="freeze_backbone")


def comparison_loss_fn(cfg: RMConfig):
    """Bradley–Terry on pairs (margin and soft labels from the rows), Plackett–Luce on rankings."""

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any], normaliser: float) -> tuple[torch.Tensor, dict]:
        rewards, present = comparison_matrix(sequence_scores(model, batch), batch)  # [B, K], best first
        if is_ranking_batch(batch):
            loss = plackett_luce_loss(rewards, present)
        else:
            loss = bradley_terry_loss(rewards[:, 0], rewards[:, 1], batch["margin"] if cfg.use_margin else None,
                                      batch["preference_probs"])
        if cfg.center_rewards:
            loss = loss + cfg.center_rewards * reward_centering_penalty(rewards, present)
        share = len(rewards) / normaliser  # means over this micro-batch -> its part of the step's mean
        loss = loss * share
        with torch.no_grad():
            detached = rewards.detach()
            others = (detached * present)[:, 1:].sum(-1) / present[:, 1:].sum(-1)
            metrics = {"loss": loss.item(),
                       "accuracy": ordered_pair_accuracy(detached, present).sum().item() / normaliser,
                       "chosen_reward": detached[:, 0].sum().item() / normaliser,
                       "rejected_reward": others.sum().item() / normaliser}
        metrics["margin"] = metrics["chosen_reward"] - metrics["rejected_reward"]
        return loss, metrics

    return loss_fn


def process_step_source(prepared: Prepared, train: TrainConfig, seed: int) -> ShuffledStepSource:
    """Shuffled steps of stepwise rows; the normaliser is the step's count of labelled reasoning steps."""
    dataset = prepared.dataset
    steps = [len(ends) for ends in dataset["step_ends"]]
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return ShuffledStepSource(len(dataset), train.batch_size, train.micro_batch_size, seed,
                              collate=lambda idx: prepared.collator([dataset[i] for i in idx]),
                              count=lambda idx: (float(sum(steps[i] for i in idx)), sum(lengths[i] for i in idx)))


def process_loss_fn(cfg: RMConfig):
    """Per-step loss at each step's separator token, over the step's labelled steps."""

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any], normaliser: float) -> tuple[torch.Tensor, dict]:
        scores = scores_at(model, batch, batch["step_ends"])  # [B, S]
        loss = process_reward_loss(scores, batch["step_labels"], batch["step_mask"], cfg.process_target, normaliser)
        right = (good_steps(scores.detach(), cfg.process_target) == (batch["step_labels"] >= 0.5))
        return loss, {"loss": loss.item(),
                      "accuracy": (right & batch["step_mask"].bool()).sum().item() / normaliser}

    return loss_fn


class HeldoutEvaluator:
    """Held-out metrics at evaluation steps — the training loss (`loss_fn`, batched and normalised by `source`, the
    step source over the held-out rows) and the accuracies — keeping the last rewards for the distribution plot."""

    def __init__(self, model: torch.nn.Module, heldout: Prepared, cfg: RMConfig, source: ShuffledStepSource,
                 loss_fn: Any, progress: RunProgress) -> None:
        self.model, self.heldout, self.cfg = model, heldout, cfg
        self.parts = heldout_loss_part(heldout, source, loss_fn, cfg.train.micro_batch_size, keys=("loss",))
        self.progress = progress
        self.rows: list[torch.Tensor] = []

    def __call__(self, step: int) -> dict[str, float]:
        metrics = Evaluation(self.parts, None, self.progress).run(self.model, step)
        if self.cfg.kind == "process":
            return metrics | process_metrics(self.model, self.heldout, self.cfg.eval.batch_size,
                                             self.cfg.process_target)
        self.rows = comparison_scores(self.model, self.heldout, self.cfg.eval.batch_size)
        return metrics | comparison_metrics(self.rows)
