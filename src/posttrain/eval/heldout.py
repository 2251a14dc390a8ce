"""Held-out evaluation of a training run: what the stage can measure on data it never trained on.

- the stage's own loss on held-out rows of the user's data (`data.eval_split` of the training rows, or an
  `eval.source` file in the same format), computed by the stage's own loss function: SFT's masked NLL per
  token (and its perplexity), DPO's loss with its reward accuracy and margins, a reward model's pairwise
  loss (`heldout_loss`);
- the stage's rewards of greedy completions of held-out prompts (the RL stages, rejection sampling,
  on-policy DPO: `heldout_rewards`);
- exact match on a built-in task's held-out problems (`accuracy.heldout_accuracy`), when the training data
  is that task or `eval.task` names one — one evaluator among the others, never forced on a user's data.

An `Evaluation` runs those a recipe gives it, each as a named progress phase, before training (eval_before)
and at the Trainer's evaluation steps, appends their greedy samples to samples.jsonl, and `summary` reports
them before and after.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.data.config import DataConfig
from posttrain.data.pipeline import Prepared, prepare_data
from posttrain.errors import ConfigError
from posttrain.eval.accuracy import EvalConfig, eval_task, heldout_accuracy
from posttrain.rewards.functions import Scores
from posttrain.rollout import Rollout, make_engine
from posttrain.rollout.base import SamplingParams
from posttrain.train.metrics import append_jsonl
from posttrain.train.progress import SILENT, Phase, RunProgress

# What one evaluator gives: its metrics (eval_*) and greedy samples for samples.jsonl.
Measured = tuple[dict[str, float], list[dict[str, Any]]]
Evaluator = Callable[[torch.nn.Module, Phase], Measured]


def heldout_data(data: DataConfig, cfg: EvalConfig) -> DataConfig | None:
    """The `data:` settings of the held-out rows — eval.source's rows, or the rows data.eval_split holds out —
    or None without either. Padded: evaluation batches need no padding-free layout to be exact."""
    if cfg.source and data.eval_split:
        raise ConfigError("held-out rows come from eval.source or from data.eval_split, not both",
                          field="eval.source")
    if cfg.source:
        return dataclasses.replace(data, source=cfg.source, eval_split=0.0, limit=0, batch_mode="padded")
    if data.eval_split:
        return dataclasses.replace(data, batch_mode="padded")
    return None


def prepare_heldout(data: DataConfig, cfg: EvalConfig, tokenizer: PreTrainedTokenizerBase, fmt: str,
                    mask_dtype: torch.dtype, progress: RunProgress | None = None) -> Prepared | None:
    """The held-out rows tokenised like the training rows (format `fmt`), or None without any."""
    heldout_cfg = heldout_data(data, cfg)
    if heldout_cfg is None:
        return None
    return prepare_data(heldout_cfg, tokenizer, accepts=(fmt,), mask_dtype=mask_dtype,
                        heldout=not cfg.source, bars=progress.library_bars() if progress is not None else None)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, size: int, collate: Callable[[list[int]], Any],
                 count: Callable[[list[int]], float], loss_fn: Callable[..., tuple[torch.Tensor, dict[str, float]]],
                 batch_size: int, bar: Phase = SILENT) -> dict[str, float]:
    """The stage's loss and statistics over all `size` held-out rows, as eval_<name>.

    `loss_fn(model, batch, normaliser)` is the stage's own: it divides by the normaliser it is given, so with
    the normaliser of the whole held-out set (`count` of every row: trained tokens, comparisons) its values
    summed over the batches (`collate(indices)`, `batch_size` rows each) are held-out means.
    """
    everything = list(range(size))
    normaliser = count(everything) or 1.0
    sums: dict[str, float] = defaultdict(float)
    was_training = model.training
    model.eval()  # no dropout: the held-out numbers of one model are one number
    try:
        for start in range(0, size, batch_size):
            indices = everything[start:start + batch_size]
            _, metrics = loss_fn(model, collate(indices), normaliser)
            for key, value in metrics.items():
                sums[key] += value
            bar.advance(len(indices))
    finally:
        model.train(was_training)
    return {f"eval_{key}": value for key, value in sums.items()}


def perplexity(nll_per_token: float) -> float:
    """exp(mean NLL per token): the number of equally likely tokens the model hesitates between."""
    return math.exp(min(nll_per_token, 700.0))  # past exp(709) a float overflows; such a model is a failure anyway


@torch.no_grad()
def heldout_rewards(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, heldout: Prepared,
                    score: Callable[[Rollout, list[dict[str, Any]]], Scores], max_new_tokens: int, problems: int,
                    batch_size: int, samples: int, bar: Phase = SILENT) -> Measured:
    """The stage's rewards of greedy completions of the first `problems` held-out prompts (verifiable rows):
    eval_reward (the weighted total), eval_reward_<function>, eval_completion_length and eval_truncated; and
    the first `samples` completions as records. `score(rollout, rows)` is the stage's reward functions on a
    rollout of `rows` (one completion per row)."""
    dataset = heldout.dataset
    count = min(problems, len(dataset))
    engine = make_engine("local", model, tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    parts: list[Scores] = []
    lengths, truncated, records = 0.0, 0.0, []
    for start in range(0, count, batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, count))]
        rollout = engine.generate([row["prompt_input_ids"] for row in rows], params)
        scores = score(rollout, rows)
        parts.append(scores)
        lengths += rollout.completion_lengths.float().sum().item()
        truncated += rollout.truncated.float().sum().item()
        for i in range(min(len(rows), samples - len(records))):
            records.append({"eval": "heldout", "prompt": rows[i]["prompt"][-1]["content"],
                            "completion": rollout.texts[i], "answer": rows[i]["answer"],
                            "reward": scores.total[i].item(),
                            "rewards": {k: v[i].item() for k, v in scores.by_function.items()}})
        bar.advance(len(rows))
    total = Scores.concat(parts)
    metrics = {"eval_reward": total.total.mean().item(),
               **{f"eval_reward_{name}": values.mean().item() for name, values in total.by_function.items()},
               "eval_completion_length": lengths / count, "eval_truncated": truncated / count}
    return metrics, records


# ----------------------------------------------------------------------------------------------
# The evaluators of a run, as a recipe assembles them.


@dataclasses.dataclass(frozen=True)
class Part:
    """One evaluator, named for its progress phase, with the amount of work its bar counts."""

    name: str
    total: int
    run: Evaluator


def accuracy_part(tokenizer: PreTrainedTokenizerBase, data: DataConfig, cfg: EvalConfig) -> list[Part]:
    """Exact match on the built-in task `eval_task` resolves (none for a user's own data without eval.task)."""
    task = eval_task(cfg, data)
    if task is None:
        return []
    resolved = dataclasses.replace(cfg, task=task)

    def run(model: torch.nn.Module, bar: Phase) -> Measured:
        accuracy = heldout_accuracy(model, tokenizer, data, resolved, bar)
        return accuracy.metrics(), accuracy.samples

    return [Part(f"evaluating {task}", cfg.problems, run)]


def loss_part(heldout: Prepared | None, source: Any, loss_fn: Callable[..., Any], batch_size: int,
              keys: tuple[str, ...] | None = None, nll: bool = False) -> list[Part]:
    """The stage's loss on the held-out rows (none without any), batched and normalised by `source`, the stage's
    own step source over those rows (its `collate(indices)` and `count(indices) -> (normaliser, tokens)`);
    `keys` keeps only those statistics, and `nll` (a per-token NLL loss) adds its perplexity."""
    if heldout is None:
        return []

    def run(model: torch.nn.Module, bar: Phase) -> Measured:
        metrics = heldout_loss(model, len(heldout.dataset), source.collate, lambda indices: source.count(indices)[0],
                               loss_fn, batch_size, bar)
        if keys is not None:
            metrics = {k: v for k, v in metrics.items() if k.removeprefix("eval_") in keys}
        if nll:
            metrics["eval_perplexity"] = perplexity(metrics["eval_loss"])
        return metrics, []

    return [Part("held-out loss", len(heldout.dataset), run)]


def reward_part(tokenizer: PreTrainedTokenizerBase, heldout: Prepared | None,
                score: Callable[[Rollout, list[dict[str, Any]]], Scores], max_new_tokens: int,
                cfg: EvalConfig) -> list[Part]:
    """The stage's rewards of greedy completions of held-out prompts (none without any, or eval.problems=0)."""
    if heldout is None or cfg.problems == 0:
        return []
    total = min(cfg.problems, len(heldout.dataset))

    def run(model: torch.nn.Module, bar: Phase) -> Measured:
        return heldout_rewards(model, tokenizer, heldout, score, max_new_tokens, cfg.problems, cfg.batch_size,
                               cfg.samples, bar)

    return [Part("held-out rewards", total, run)]


class Evaluation:
    """The held-out evaluations of one run: `run(model, step)` runs each part as a named progress phase,
    appends its greedy samples (with the step) to `samples`, and returns all their metrics."""

    def __init__(self, parts: list[Part], samples: Path | None, progress: RunProgress | None = None) -> None:
        self.parts, self.samples = parts, samples
        self.progress = progress or RunProgress(enabled=False)

    def __bool__(self) -> bool:
        return bool(self.parts)

    def run(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for part in self.parts:
            with self.progress.phase(part.name, part.total) as bar:
                values, records = part.run(model, bar)
            metrics |= values
            if self.samples is not None and records:
                append_jsonl(self.samples, [{"step": step, **record} for record in records])
        return metrics

    def evaluator(self, model: torch.nn.Module) -> Callable[[int], dict[str, float]] | None:
        """The Trainer's `evaluate(step)` of `model` (None: nothing to evaluate)."""
        return (lambda step: self.run(model, step)) if self.parts else None


ACCURACY_KEYS = ("eval_accuracy", "eval_accuracy_ci_low", "eval_accuracy_ci_high", "eval_step_accuracy")


def summary(before: dict[str, float] | None, last: dict[str, Any], cfg: EvalConfig, data: DataConfig,
            heldout: Prepared | None = None) -> dict[str, Any]:
    """What a run's summary reports of its evaluation: the task's accuracy before and after (accuracy_before,
    accuracy, accuracy_ci, step accuracy, eval_problems), every other held-out metric after and, when measured,
    before (eval_loss_before, eval_loss, ...), and the held-out rows' count."""
    out: dict[str, Any] = {}
    if eval_task(cfg, data) is not None:
        if before is not None:
            out["accuracy_before"] = before.get("eval_accuracy")
            if "eval_step_accuracy" in before:
                out["step_accuracy_before"] = before["eval_step_accuracy"]
        out |= {"accuracy": last.get("eval_accuracy"),
                "accuracy_ci": [last.get("eval_accuracy_ci_low"), last.get("eval_accuracy_ci_high")]}
        if "eval_step_accuracy" in last:
            out["step_accuracy"] = last["eval_step_accuracy"]
        out["eval_problems"] = cfg.problems
    for key, value in last.items():
        if key.startswith("eval_") and key not in ACCURACY_KEYS:
            if before is not None and key in before:
                out[f"{key}_before"] = before[key]
            out[key] = value
    if heldout is not None:
        out["eval_rows"] = len(heldout.dataset)
    return out
