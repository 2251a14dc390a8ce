"""Supervised fine-tuning: maximise the likelihood of the demonstrations' assistant tokens.

loss = - sum over trained tokens of log p(token | context) / (trained tokens in the whole step)

Only assistant tokens (with the EOS that ends each turn) are trained; the prompt is context. The
normaliser is the trained-token count of the whole accumulated step, so micro-batching does not
change the gradient. Full fine-tuning by default; LoRA or prefix-tuning through peft by option.
Padded, padding-free and packed batches give the same per-token loss (see `posttrain.data.collate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from posttrain.algos import sft_loss
from posttrain.config import ModelConfig, OptimConfig, RunConfig, param, section
from posttrain.data.columns import row_lengths, row_sums
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import Prepared, prepare_data
from posttrain.data.tokenize import turn_end_ids
from posttrain.errors import ConfigError
from posttrain.eval import heldout
from posttrain.eval.accuracy import EvalConfig
from posttrain.eval.report import write_training_report
from posttrain.models import count_parameters, load_tokenizer_and_model
from posttrain.models.adapters import AdapterConfig, apply_adapter, save_trained
from posttrain.models.likelihood import response_logprobs
from posttrain.recipes.layout import batches_for
from posttrain.train.engine import TrainConfig, Trainer, forward_precision
from posttrain.train.entry import stage_main
from posttrain.train.progress import RunProgress
from posttrain.train.run_dir import RunResult, prepare_run_dir
from posttrain.train.sources import ShuffledStepSource


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    run: RunConfig = section(lambda: RunConfig(name="sft"), "Run directory, seed, logging.")
    model: ModelConfig = section(lambda: ModelConfig(path="runs/pretrain/final"), "The model to fine-tune.")
    adapter: AdapterConfig = section(AdapterConfig, "Full fine-tuning, LoRA or prefix-tuning.")
    data: DataConfig = section(lambda: DataConfig(source="arith", size=20_000), "Training data and batching.")
    optim: OptimConfig = section(lambda: OptimConfig(lr=1e-3, warmup_steps=20), "Optimizer and schedule.")
    train: TrainConfig = section(lambda: TrainConfig(max_steps=300, batch_size=64, micro_batch_size=64),
                                 "Loop length, batch size, checkpoints.")
    eval: EvalConfig = section(EvalConfig, "Held-out evaluation: the loss on held-out rows (eval.source or "
                                           "data.eval_split), exact match on a built-in task.")
    eval_before: bool = param(True, "Also evaluate the starting model, to report the gain.")


@stage_main(SFTConfig)
def main(cfg: SFTConfig) -> RunResult:
    if not cfg.model.path:
        raise ConfigError("SFT fine-tunes an existing model: set model.path (e.g. runs/pretrain/final, from "
                          "`posttrain pretrain`)", field="model.path")
    tokenizer, model = load_tokenizer_and_model(cfg.model, compares_logprobs=False)  # dropout regularises SFT
    cfg = batches_for(cfg, model)
    progress = RunProgress.for_run(cfg.run)
    prepared = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS["sft"], mask_dtype=model.dtype,
                            bars=progress.library_bars(), imitates=True)
    rows = heldout.prepare_heldout(cfg.data, cfg.eval, tokenizer, prepared.format, model.dtype, progress)
    run_dir = prepare_run_dir(cfg.run, cfg, stage="sft", model=model)
    evaluation = heldout.Evaluation(heldout.accuracy_part(tokenizer, cfg.data, cfg.eval) + heldout.loss_part(
        rows, step_source(rows, cfg.train, cfg.run.seed) if rows else None, sft_loss_fn, cfg.train.micro_batch_size,
        nll=True), run_dir.samples, progress)

    with forward_precision(cfg.train, model):
        before = evaluation.run(model, 0) if cfg.eval_before and evaluation else None
    model = apply_adapter(model, cfg.adapter)
    trainer = Trainer(stage="sft", cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim, run_dir=run_dir,
                      model=model, tokenizer=tokenizer, progress=progress)
    result = trainer.fit(step_source(prepared, cfg.train, cfg.run.seed), sft_loss_fn, evaluation.evaluator(model),
                         progress_keys=("loss", "eval_loss", "eval_accuracy"))

    final_dir = save_trained(model, tokenizer, run_dir.final, cfg.adapter, turn_end_ids(tokenizer))
    summary = {"trainable_parameters": count_parameters(model, trainable_only=True), **result.totals(),
               "final_loss": result.last.get("loss"),
               **heldout.summary(before, result.last, cfg.eval, cfg.data, rows),
               "data": prepared.tokenized.stats.as_dict()}
    write_training_report(run_dir, f"SFT on {cfg.data.source}", summary)
    return RunResult(run_dir=run_dir.path, final_dir=final_dir, summary=summary)


def step_source(prepared: Prepared, train: TrainConfig, seed: int,
                weights: Sequence[float] | None = None) -> ShuffledStepSource:
    """Shuffled steps over the prepared rows; the normaliser is the step's trained-token count.

    `weights` (one per dataset row, >= 0, padded batches) make it weighted likelihood: row i's tokens count
    w_i times in the loss, and the normaliser is the trained tokens of the rows weighted > 0, sum_{w_i > 0} n_i,
    so all-1 weights are SFT exactly, 0/1 weights are SFT on the rows weighted 1 (rejection sampling, offline
    RFT; see `recipes.rft`), and a weight is absolute: a step of rows weighted 0.1 moves the model a tenth as far
    as one of rows weighted 1 (a normaliser sum_i w_i n_i would cancel the weights of a step whose rows share one).
    """
    dataset = prepared.dataset
    # A sample's first token is never a target (the collators zero it), so these are exact counts.
    trained = row_sums(dataset, "response_mask").astype(int).tolist()
    lengths = row_lengths(dataset, "input_ids")
    row_weights = [1.0] * len(dataset) if weights is None else [float(w) for w in weights]

    def count(indices: list[int]) -> tuple[float, int]:
        return float(sum(trained[i] for i in indices if row_weights[i] > 0)), sum(lengths[i] for i in indices)

    def collate(indices: list[int]) -> dict[str, Any]:
        batch = prepared.collator([dataset[i] for i in indices])
        if weights is not None:
            batch["weights"] = torch.tensor([row_weights[i] for i in indices])
        return batch

    return ShuffledStepSource(len(dataset), train.batch_size, train.micro_batch_size, seed, collate=collate,
                              count=count, rows=prepared.source)


def sft_loss_fn(model: torch.nn.Module, batch: dict[str, Any], normaliser: float) -> tuple[torch.Tensor, dict]:
    logprobs, mask = response_logprobs(model, batch)
    loss = sft_loss(logprobs, mask, normaliser=normaliser or 1.0, weights=batch.get("weights"))
    return loss, {"loss": loss.item()}
