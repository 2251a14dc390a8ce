"""Held-out evaluation of reward models: pairwise accuracy and margins of outcome reward models, step
accuracy and first-error detection of process reward models, and the reward distribution.

The held-out rows come from the same source as the training rows (a built-in task's held-out split
by default: problems training never saw), tokenised and collated the same way.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch

from posttrain.config import param
from posttrain.data.config import DataConfig
from posttrain.data.pipeline import Prepared
from posttrain.data.tasks import TASKS
from posttrain.errors import ConfigError
from posttrain.eval.plotting import new_figure, save_png
from posttrain.models.device import model_device, move_to
from posttrain.models.reward import scores_at, sequence_scores
from posttrain.train.comparisons import (
    comparison_accuracy,
    comparison_levels,
    comparison_matrix,
    ordered_pairs,
)


@dataclasses.dataclass(frozen=True)
class RewardEvalConfig:
    source: str | None = param(None, "Held-out rows: a file or task (None: the rows data.eval_split holds out, "
                                     "else the training task's held-out split; a training file without either "
                                     "is not evaluated).")
    split: str = param("heldout", "Split of the held-out source (a built-in task's `heldout`, or a DatasetDict "
                                  "split).")
    size: int = param(500, "Held-out rows drawn from a built-in task.", ge=1)
    seed: int = param(1234, "Seed of a built-in task's held-out rows.", ge=0)
    batch_size: int = param(64, "Rows scored together.", ge=1)


def heldout_data_config(data: DataConfig, cfg: RewardEvalConfig) -> DataConfig | None:
    """The `data:` settings of the held-out rows, or None when there is no held-out source: the rows
    data.eval_split holds out of the training data (read with `prepare_data(..., heldout=True)`), else
    eval.source, else a built-in training task's held-out split."""
    # Padded: scoring batches are larger than training ones, too large for one padding-free row.
    if data.eval_split:
        if cfg.source:
            raise ConfigError("held-out rows come from eval.source or from data.eval_split, not both",
                              field="eval.source")
        return dataclasses.replace(data, batch_mode="padded")
    source = cfg.source or (data.source if data.source in TASKS else None)
    if source is None:
        return None
    return dataclasses.replace(data, source=source, split=cfg.split, size=cfg.size, seed=cfg.seed, limit=0,
                               batch_mode="padded")


def _batches(prepared: Prepared, batch_size: int, model: torch.nn.Module):
    """The held-out rows in collated batches of `batch_size`, on `model`'s device."""
    dataset, device = prepared.dataset, model_device(model)
    for start in range(0, len(dataset), batch_size):
        yield move_to(prepared.collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]),
                      device)


class ScoredComparison(NamedTuple):
    """One held-out comparison's rewards [K], best first, and its responses' levels [K] (0 = best; tied
    responses share a level); a preference pair's soft label."""

    rewards: torch.Tensor
    levels: torch.Tensor
    preference_prob: float = 1.0  # a pair's soft label: the share of annotators preferring the first response

    @property
    def best(self) -> torch.Tensor:
        return self.rewards[self.levels == 0]

    @property
    def others(self) -> torch.Tensor:
        return self.rewards[self.levels > 0]


@torch.no_grad()
def comparison_scores(model: torch.nn.Module, prepared: Prepared, batch_size: int) -> list[ScoredComparison]:
    """The reward of every response of every held-out comparison, one row per comparison."""
    was_training = model.training
    model.eval()
    rows: list[ScoredComparison] = []
    for batch in _batches(prepared, batch_size, model):
        matrix, mask = comparison_matrix(sequence_scores(model, batch).float(), batch)
        levels = comparison_levels(batch, matrix)
        probs = batch.get("preference_probs", torch.ones(len(matrix))).tolist()
        rows += [ScoredComparison(row[keep], level[keep], prob)
                 for row, level, keep, prob in zip(matrix.cpu(), levels.cpu(), mask.cpu(), probs, strict=True)]
    model.train(was_training)
    return rows


def comparison_metrics(rows: list[ScoredComparison], prefix: str = "eval_") -> dict[str, float]:
    """Pairwise accuracy (per comparison, the share of its ordered response pairs scored in the right order, tied
    pairs ordering nothing, soft-labelled pairs as `comparison_accuracy` counts them; mean over comparisons), mean
    margin over those pairs, and the distribution of the best (chosen) and the other (rejected) responses' rewards
    (their standard deviations 0 for a single reward)."""
    accuracy, margin, pairs = 0.0, 0.0, 0
    for row in rows:
        scores, levels = row.rewards.unsqueeze(0), row.levels.unsqueeze(0)
        keep = torch.ones_like(scores, dtype=torch.bool)
        soft = torch.tensor([row.preference_prob]) if row.preference_prob != 1.0 else None
        accuracy += comparison_accuracy(scores, keep, levels, soft).item()
        differences, mask = ordered_pairs(scores, keep, levels)
        margin += differences.sum().item()
        pairs += int(mask.sum())
    chosen = torch.cat([row.best for row in rows])
    rejected = torch.cat([row.others for row in rows])
    everything = torch.cat([chosen, rejected])
    quantiles = torch.quantile(everything, torch.tensor([0.05, 0.5, 0.95]))
    return {f"{prefix}accuracy": accuracy / len(rows), f"{prefix}margin": margin / max(pairs, 1),
            f"{prefix}chosen_mean": chosen.mean().item(), f"{prefix}chosen_std": _std(chosen),
            f"{prefix}rejected_mean": rejected.mean().item(), f"{prefix}rejected_std": _std(rejected),
            f"{prefix}reward_p05": quantiles[0].item(), f"{prefix}reward_p50": quantiles[1].item(),
            f"{prefix}reward_p95": quantiles[2].item()}


def _std(values: torch.Tensor) -> float:
    """The sample standard deviation; 0 for one value (one held-out comparison), not NaN."""
    return values.std().item() if len(values) > 1 else 0.0


def plot_reward_distribution(rows: list[ScoredComparison], out: Path, title: str) -> Path:
    """Histogram of held-out rewards, chosen (best) against rejected (the others). Rewards that are not finite (a
    diverged model) cannot be binned: they are left out, and the title counts them."""
    chosen = [v for row in rows for v in row.best.tolist()]
    rejected = [v for row in rows for v in row.others.tolist()]
    finite = [[v for v in values if math.isfinite(v)] for values in (chosen, rejected)]
    left_out = len(chosen) + len(rejected) - sum(map(len, finite))
    fig = new_figure(5.5, 3.6)
    ax = fig.subplots()
    ax.hist(finite, bins=40, label=["chosen (best)", "rejected"], alpha=0.75, histtype="stepfilled")
    ax.set_xlabel("reward")
    ax.set_ylabel("responses")
    ax.set_title(title + (f" ({left_out} not finite, left out)" if left_out else ""), parse_math=False)  # a path's "$"
    ax.legend()
    return save_png(fig, out)


def good_steps(scores: torch.Tensor, target: str) -> torch.Tensor:
    """Whether each step is judged correct: sigmoid(score) > 0.5 for a classifier, score > 0.5 for a
    regressor of step values in [0, 1]."""
    return scores > (0.0 if target == "classification" else 0.5)


@torch.no_grad()
def process_metrics(model: torch.nn.Module, prepared: Prepared, batch_size: int, target: str,
                    prefix: str = "eval_") -> dict[str, Any]:
    """Step accuracy, first-error detection and whole-solution accuracy on held-out stepwise rows.

    first-error accuracy: the first step judged wrong is the first step labelled wrong (or both find
    none) — what a verifier that stops a chain at its first mistake needs.
    """
    was_training = model.training
    model.eval()
    right_steps = steps = first_right = solutions_right = chains = 0
    for batch in _batches(prepared, batch_size, model):
        predicted = good_steps(scores_at(model, batch, batch["step_ends"]), target)
        labelled = batch["step_labels"] >= 0.5
        mask = batch["step_mask"].bool()
        right_steps += int(((predicted == labelled) & mask).sum())
        steps += int(mask.sum())
        first_right += int((first_bad(predicted, mask) == first_bad(labelled, mask)).sum())
        solutions_right += int(((predicted | ~mask).all(-1) == (labelled | ~mask).all(-1)).sum())
        chains += len(mask)
    model.train(was_training)
    return {f"{prefix}step_accuracy": right_steps / steps, f"{prefix}first_error_accuracy": first_right / chains,
            f"{prefix}solution_accuracy": solutions_right / chains}


def first_bad(good: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Index of the first step judged (or labelled) wrong in each chain, or the step count if none: [B]."""
    bad = ~good & mask
    steps = mask.sum(-1)
    first = torch.where(bad.any(-1), bad.int().argmax(-1), steps)
    return first
