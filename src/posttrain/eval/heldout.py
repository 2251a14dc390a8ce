"""Held-out evaluation of a training run: what the stage can measure on data it never trained on.

- the stage's own loss on held-out rows of the user's data (`data.eval_split` of the training rows, or an
  `eval.source` file in the same format), computed by the stage's own loss function: SFT's masked NLL per
  token (and its perplexity), DPO's loss with its reward accuracy and margins, a reward model's pairwise
  loss (`heldout_loss`);
- the stage's rewards of greedy completions of held-out prompts (the RL stages, rejection sampling,
  on-policy DPO: `greedy_scores`), and, for rows with a `category` column, the headroom per category from
  samples at temperature 1 (`sampled_scores`, `reward_part`);
- exact match on a built-in task's held-out problems (`accuracy.heldout_accuracy`), when the training data
  is that task or `eval.task` names one — one evaluator among the others, never forced on a user's data.

An `Evaluation` runs those a recipe gives it, each as a named progress phase, before training (eval_before)
and at the Trainer's evaluation steps, appends their greedy samples to samples.jsonl, and `summary` reports
them before and after.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.data.config import DataConfig
from posttrain.data.pipeline import Prepared, prepare_data
from posttrain.data.schemas import prompt_as_given
from posttrain.data.tasks import get_task
from posttrain.data.tasks.base import Task
from posttrain.errors import ConfigError, DataError
from posttrain.eval.accuracy import Accuracy, EvalConfig, dev_problems, eval_task, heldout_accuracy
from posttrain.eval.headroom import OVERALL, headroom, headroom_rows
from posttrain.models.device import model_device, move_to
from posttrain.models.precision import autocast_dtype
from posttrain.rewards.functions import NEEDS_ANSWER, Completions, Scores
from posttrain.rollout import Rollout, make_engine
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.recompute import packed_logprobs_and_entropy
from posttrain.train.metrics import append_jsonl, read_metrics, write_json
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
    """The held-out rows tokenised like the training rows (format `fmt`; a verifiable row's `category` checked),
    or None without any."""
    heldout_cfg = heldout_data(data, cfg)
    if heldout_cfg is None:
        return None
    prepared = prepare_data(heldout_cfg, tokenizer, accepts=(fmt,), mask_dtype=mask_dtype,
                            heldout=not cfg.source, bars=progress.library_bars() if progress is not None else None)
    if "row" in prepared.dataset.column_names:  # verifiable rows: a bad `category` stops the run before it starts
        row_categories(prepared)
    return prepared


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
            _, metrics = loss_fn(model, move_to(collate(indices), model_device(model)), normaliser)
            for key, value in metrics.items():
                sums[key] += value
            bar.advance(len(indices))
    finally:
        model.train(was_training)
    return {f"eval_{key}": value for key, value in sums.items()}


def perplexity(nll_per_token: float) -> float:
    """exp(mean NLL per token): the number of equally likely tokens the model hesitates between."""
    return math.exp(min(nll_per_token, 700.0))  # past exp(709) a float overflows; such a model is a failure anyway


def completions_of(rollout: Rollout, rows: list[dict[str, Any]]) -> Completions:
    """What the reward functions read, row by row of the rollout (row i completes prompt prompt_index[i]) of
    verifiable `rows` (prepared: prompt messages, answer, steps and the whole row as JSON in `row`)."""
    index = rollout.prompt_index.tolist()
    columns = [json.loads(row["row"]) if row.get("row") else {} for row in rows]
    return Completions(prompts=[rows[i]["prompt"] for i in index], completions=list(rollout.texts),
                       answers=[rows[i]["answer"] for i in index],
                       steps=[list(rows[i].get("steps") or []) for i in index], columns=[columns[i] for i in index])


def check_gold_answers(dataset: Any, name: str, functions: Iterable[str], uses_gold: bool = False,
                       task: Task | None = None) -> None:
    """Prompt-only rows (no gold answer) train or evaluate only with rewards that do not compare with one, and a
    task verifies only answers it can read (`Task.canonical_answer`: an integer for arith, "05" and "1,000"
    included): a clear error naming the first such row, before anything is sampled."""
    needing = [f for f in functions if f in NEEDS_ANSWER] + (["loss.sft_coef (gold answers)"] if uses_gold else [])
    if not needing:
        return
    missing = next((line for line, answer in zip(dataset["line"], dataset["answer"], strict=True) if answer is None),
                   None)
    if missing is not None:
        raise DataError(f"the row has no gold answer (prompt-only data), which {', '.join(needing)} needs: give "
                        "an `answer` column, or use a reward that reads none (reward_model, grader, your own "
                        "function: reward.functions={my_rewards.py:fn: 1.0})", file=name, line=missing,
                        field="answer")
    if task is None or "correct" not in needing:
        return
    for line, answer in zip(dataset["line"], dataset["answer"], strict=True):
        if task.canonical_answer(answer) is None:
            raise DataError(f"{answer!r} is not an answer the {task.name} task's check can match ({task.description}):"
                            " every completion would score 0 on it; give its answers in that form, or score them "
                            "with a grader or your own function (reward.functions={my_rewards.py:fn: 1.0})",
                            file=name, line=line, field="answer")


CATEGORY = "category"


def row_categories(heldout: Prepared) -> list[str | None]:
    """The `category` column of each prepared verifiable row (None: the row has none and counts in "all" only):
    text, or an integer read as text; anything else is a DataError naming the file, line and field."""
    name = heldout.tokenized.name
    categories: list[str | None] = []
    for line, row in zip(heldout.dataset["line"], heldout.dataset["row"], strict=True):
        value = json.loads(row or "{}").get(CATEGORY)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if value is not None and not isinstance(value, str):
            raise DataError(f"a category must be text (or an integer), got {type(value).__name__} {value!r}",
                            file=name, line=line, field=CATEGORY)
        if value is not None and not value.strip():
            raise DataError("empty category: leave it out (or null) for a row that belongs to none", file=name,
                            line=line, field=CATEGORY)
        if value == OVERALL:  # the table's own row of every problem: a category of that name would replace it
            raise DataError(f"{OVERALL!r} names the row of every problem in the headroom tables: give this category "
                            "another name", file=name, line=line, field=CATEGORY)
        categories.append(value)
    return categories


@dataclasses.dataclass(frozen=True)
class CorrectRule:
    """When a scored completion counts as correct: the score of the reward function `by` reaches `threshold`;
    without `by`, the `correct` reward (the task's answer check against the `answer` column) when the rewards
    include it, else the weighted total reward. The default threshold, 1, is a right answer of a 0/1 function or
    full credit of a grader."""

    by: str | None = None
    threshold: float = 1.0

    @classmethod
    def of(cls, cfg: EvalConfig) -> CorrectRule:
        return cls(by=cfg.correct_by, threshold=cfg.correct_threshold)

    def source(self, functions: Iterable[str]) -> str | None:
        """The reward function that decides (None: the weighted total)."""
        return self.by or ("correct" if "correct" in functions else None)

    def check(self, functions: Iterable[str], field: str) -> None:
        """`by` names one of the rewards: a ConfigError naming `field` (the option or setting) otherwise."""
        functions = list(functions)
        if self.by is not None and self.by not in functions:
            raise ConfigError(f"{self.by!r} is not one of the reward functions ({', '.join(functions)})", field=field)

    def mask(self, scores: Scores) -> torch.Tensor:
        """Which completions count as correct, [B] bool."""
        by = self.source(scores.by_function)
        return (scores.total if by is None else scores.by_function[by]) >= self.threshold

    def describe(self, functions: Iterable[str]) -> str:
        """The rule in words, for eval.json."""
        by = self.source(functions)
        return f"{'weighted total reward' if by is None else f'reward {by}'} >= {self.threshold:g}"


@dataclasses.dataclass(frozen=True)
class GreedyScores:
    """The stage's rewards of greedy completions of held-out rows (one per row, in order), with their mean
    completion length and truncated share, and the first completions as sample records."""

    scores: Scores
    completion_length: float
    truncated: float
    records: list[dict[str, Any]]

    def metrics(self) -> dict[str, float]:
        return {"eval_reward": self.scores.total.mean().item(),
                **{f"eval_reward_{name}": values.mean().item() for name, values in self.scores.by_function.items()},
                "eval_completion_length": self.completion_length, "eval_truncated": self.truncated}


@torch.no_grad()
def greedy_scores(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, heldout: Prepared,
                  score: Callable[[Rollout, list[dict[str, Any]]], Scores], max_new_tokens: int, problems: int,
                  batch_size: int, samples: int, bar: Phase = SILENT) -> GreedyScores:
    """The stage's rewards of greedy completions of the first `problems` held-out prompts (verifiable rows).
    `score(rollout, rows)` is the stage's reward functions on a rollout of `rows` (one completion per row)."""
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
            records.append({"eval": "heldout", "prompt": prompt_as_given(rows[i]["prompt"]),
                            "completion": rollout.texts[i], "answer": rows[i]["answer"],
                            "reward": scores.total[i].item(),
                            "rewards": {k: v[i].item() for k, v in scores.by_function.items()}})
        bar.advance(len(rows))
    return GreedyScores(scores=Scores.concat(parts), completion_length=lengths / count, truncated=truncated / count,
                        records=records)


@dataclasses.dataclass(frozen=True)
class SampledScores:
    """`n` completions per held-out row at temperature 1: each row's count of correct ones (`CorrectRule`),
    every reward function's mean over all the samples, and their mean KL to a reference (None without one)."""

    n: int
    correct: list[int]
    rewards: dict[str, float]
    kl: float | None = None


REFERENCE_ROW_TOKENS = 512  # the packed rows of a reference's pass over sampled completions


def sampled_kl_sum(reference: torch.nn.Module, rollout: Rollout) -> float:
    """The sum over `rollout`'s completions of their KL to `reference` (each completion's summed log-ratio, sampled
    at temperature 1). Padding-free, one copy of each prompt per group of its samples: the same logprobs as the
    padded forward over [prompt | completion] rows at a fraction of its tokens."""
    ref, _ = packed_logprobs_and_entropy(reference, rollout, 1.0, entropy=False, capacity=REFERENCE_ROW_TOKENS,
                                         share_prompts=True)
    return ((rollout.logprobs - ref) * rollout.response_mask).sum().item()


@torch.no_grad()
def sampled_scores(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, heldout: Prepared,
                   score: Callable[[Rollout, list[dict[str, Any]]], Scores], n: int, max_new_tokens: int,
                   problems: int, batch_size: int, seed: int, rule: CorrectRule = CorrectRule(),
                   bar: Phase = SILENT, reference: torch.nn.Module | None = None) -> SampledScores:
    """`n` samples at temperature 1 of each of the first `problems` held-out prompts, scored by the stage's rewards
    (`score(rollout, rows)`), and their KL to `reference` where one is given. Each prompt's samples draw from
    streams seeded by `seed` and the prompt's index only, so two models are sampled with the same random numbers
    (a paired comparison with less noise), and a prompt's samples are the same at any `batch_size`."""
    dataset = heldout.dataset
    count = min(problems, len(dataset))
    engine = make_engine("local", model, tokenizer)
    per_call = max(1, batch_size // n)
    correct: list[int] = []
    sums: dict[str, float] = defaultdict(float)
    kl_total = 0.0
    for start in range(0, count, per_call):
        rows = [dataset[i] for i in range(start, min(start + per_call, count))]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=n,
                                prompt_seeds=tuple(range(seed + start, seed + start + len(rows))))
        rollout = engine.generate([row["prompt_input_ids"] for row in rows], params)
        scores = score(rollout, rows)
        hits = rule.mask(scores)
        per_row = torch.zeros(len(rows), dtype=torch.long).index_add_(0, rollout.prompt_index, hits.long())
        correct += per_row.tolist()
        for name, values in scores.by_function.items():
            sums[name] += values.sum().item()
        if reference is not None:
            kl_total += sampled_kl_sum(reference, rollout)
        bar.advance(len(rows) * n)
    return SampledScores(n=n, correct=correct, rewards={name: total / (count * n) for name, total in sums.items()},
                         kl=kl_total / (count * n) if reference is not None else None)


# ----------------------------------------------------------------------------------------------
# The evaluators of a run, as a recipe assembles them.


@dataclasses.dataclass(frozen=True)
class Part:
    """One evaluator, named for its progress phase, with the amount of work its bar counts."""

    name: str
    total: int
    run: Evaluator
    per_problem: Callable[[], dict[str, Any]] | None = None
    """What its last run measured per problem, for `Evaluation` to record (exact match's), or None."""
    final_only: bool = False
    """Measured only where the run ends (the test problems, when a dev draw is scored at every evaluation)."""


def accuracy_part(tokenizer: PreTrainedTokenizerBase, data: DataConfig, cfg: EvalConfig) -> list[Part]:
    """Exact match on the built-in task `eval_task` resolves (none for a user's own data without eval.task). With
    eval.dev_problems, a dev draw disjoint from the held-out problems is scored at every evaluation (dev_accuracy,
    dev_step_accuracy: what train.stop_when reads) and the held-out problems only where the run ends."""
    task = eval_task(cfg, data)
    if task is None:
        if cfg.dev_problems:
            raise ConfigError("eval.dev_problems draws problems of a built-in task: set eval.task (and eval.problems "
                              "> 0)", field="eval.dev_problems")
        return []
    resolved = dataclasses.replace(cfg, task=task)
    last: dict[str, Any] = {}

    def run(model: torch.nn.Module, bar: Phase) -> Measured:
        accuracy = heldout_accuracy(model, tokenizer, data, resolved, bar)
        last.update(task=task, seed=resolved.seed, max_new_tokens=resolved.max_new_tokens,
                    precision=current_precision(),
                    accuracy={k: v for k, v in dataclasses.asdict(accuracy).items() if k != "samples"})
        return accuracy.metrics(), accuracy.samples

    test = Part(f"evaluating {task}", cfg.problems, run, per_problem=lambda: dict(last),
                final_only=cfg.dev_problems > 0)
    if cfg.dev_problems == 0:
        return [test]

    examples = dev_problems(get_task(task), cfg.dev_problems, cfg.problems, cfg.seed)  # refused now if too few

    def run_dev(model: torch.nn.Module, bar: Phase) -> Measured:
        return heldout_accuracy(model, tokenizer, data, resolved, bar, examples).metrics("dev_"), []

    return [Part(f"scoring {task}'s dev problems", cfg.dev_problems, run_dev), test]


def current_precision() -> str:
    """The precision the forwards run in right now (the run's autocast), as a recorded evaluation names it."""
    return "bf16" if autocast_dtype("cpu") == torch.bfloat16 or autocast_dtype("cuda") == torch.bfloat16 else "fp32"


# The last evaluation's exact match per problem, beside samples.jsonl: `posttrain eval` reuses it for the final model
# instead of decoding the same problems greedily again (`recorded_accuracy`).
PER_PROBLEM_FILE = "heldout_problems.json"


def recorded_accuracy(run_dir: Path, step: int, task: str, cfg: EvalConfig, precision: str) -> Accuracy | None:
    """The exact match a run recorded at `step` on `task`'s first `cfg.problems` held-out problems (same seed and
    token budget, forwards in `precision`), or None when it recorded no such evaluation."""
    try:
        record = json.loads((run_dir / PER_PROBLEM_FILE).read_text(encoding="utf-8"))
        accuracy = Accuracy(**record["accuracy"], samples=[])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    wanted = {"step": step, "task": task, "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens,
              "precision": precision}
    if any(record.get(key) != value for key, value in wanted.items()) or accuracy.problems != cfg.problems:
        return None
    return dataclasses.replace(accuracy, correct=tuple(accuracy.correct), steps_right=tuple(accuracy.steps_right))


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
                cfg: EvalConfig, functions: Iterable[str] = ()) -> list[Part]:
    """The stage's rewards of greedy completions of held-out prompts (none without any, or eval.problems=0); when
    the rows have a `category` column (read and checked now, before training), also the headroom per category
    (`headroom`) from eval.headroom_samples samples per prompt at temperature 1, as eval_headroom.<category>.<metric>
    (`summary` turns them back into tables). `functions`: the names of the stage's rewards, which eval.correct_by
    must be one of."""
    rule = CorrectRule.of(cfg)
    rule.check(functions, "eval.correct_by")
    if heldout is None or cfg.problems == 0:
        return []
    total = min(cfg.problems, len(heldout.dataset))
    categories = row_categories(heldout)[:total]
    n = cfg.headroom_samples if any(c is not None for c in categories) else 0

    def run(model: torch.nn.Module, bar: Phase) -> Measured:
        greedy = greedy_scores(model, tokenizer, heldout, score, max_new_tokens, cfg.problems, cfg.batch_size,
                               cfg.samples, bar)
        metrics = greedy.metrics()
        if n:
            sampled = sampled_scores(model, tokenizer, heldout, score, n, max_new_tokens, cfg.problems,
                                     cfg.batch_size, cfg.seed, rule, bar)
            greedy_correct = tuple(rule.mask(greedy.scores).tolist())
            metrics |= flat_headroom(headroom(categories, sampled.correct, n, [n], greedy_correct))
        return metrics, greedy.records

    return [Part("held-out rewards", total * (1 + n), run)]


HEADROOM_PREFIX = "eval_headroom."


def flat_headroom(table: dict[str, dict[str, float]]) -> dict[str, float]:
    """A `headroom` table as flat metrics, eval_headroom.<category>.<metric> (metrics.jsonl holds numbers)."""
    return {f"{HEADROOM_PREFIX}{category}.{metric}": value for category, entry in table.items()
            for metric, value in entry.items()}


def unflat_headroom(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The `headroom` table back from flat metrics (a category may hold dots; a metric name has none)."""
    table: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith(HEADROOM_PREFIX):
            category, metric = key.removeprefix(HEADROOM_PREFIX).rsplit(".", 1)
            table.setdefault(category, {})[metric] = value
    return table


def _recorded_at_start(samples: Path) -> bool:
    """Whether the samples of the starting model's evaluation are in `samples` already: a resumed run measures it
    again (for its summary), and its samples, the same, are not appended twice."""
    return samples.is_file() and any(record.get("step", 0) == 0 and "completion" in record
                                     for record in read_metrics(samples))


class Evaluation:
    """The held-out evaluations of one run: `run(model, step)` runs each part as a named progress phase,
    appends its greedy samples (with the step) to `samples`, records the exact match per problem beside it
    (`PER_PROBLEM_FILE`, overwritten: the last evaluation's), and returns all their metrics."""

    def __init__(self, parts: list[Part], samples: Path | None, progress: RunProgress | None = None) -> None:
        self.parts, self.samples = parts, samples
        self.progress = progress or RunProgress(enabled=False)
        self._step: int | None = None  # the step `_measured` holds each part's metrics of
        self._measured: dict[int, dict[str, float]] = {}

    def __bool__(self) -> bool:
        return bool(self.parts)

    def run(self, model: torch.nn.Module, step: int, final: bool = True) -> dict[str, float]:
        """Every part's metrics (`final`: the run ends here) or, at a periodic evaluation, those not `final_only`.
        A part already measured at `step` (the periodic evaluation just before a stopping rule ended the run there)
        is not measured again."""
        metrics: dict[str, float] = {}
        if self._step != step:
            self._step, self._measured = step, {}
        # Decided before any part appends: every part's step-0 samples are written once, by the first process.
        recorded = step == 0 and self.samples is not None and _recorded_at_start(self.samples)
        for i, part in enumerate(self.parts):
            if part.final_only and not final:
                continue
            if i in self._measured:
                metrics |= self._measured[i]
                continue
            with self.progress.phase(part.name, part.total) as bar:
                values, records = part.run(model, bar)
            self._measured[i] = values
            metrics |= values
            if self.samples is not None and records and not recorded:
                append_jsonl(self.samples, [{"step": step, **record} for record in records])
            if self.samples is not None and part.per_problem is not None:
                write_json(self.samples.with_name(PER_PROBLEM_FILE), {"step": step, **part.per_problem()})
        return metrics

    def evaluator(self, model: torch.nn.Module) -> Callable[[int, bool], dict[str, float]] | None:
        """The Trainer's `evaluate(step, final)` of `model` (None: nothing to evaluate)."""
        return (lambda step, final: self.run(model, step, final)) if self.parts else None


ACCURACY_KEYS = ("eval_accuracy", "eval_accuracy_ci_low", "eval_accuracy_ci_high", "eval_step_accuracy")


def summary(before: dict[str, float] | None, last: dict[str, Any], cfg: EvalConfig, data: DataConfig,
            heldout: Prepared | None = None) -> dict[str, Any]:
    """What a run's summary reports of its evaluation: the task's accuracy before and after (accuracy_before,
    accuracy, accuracy_ci, step accuracy, eval_problems), every other held-out metric after and, when measured,
    before (eval_loss_before, eval_loss, ...), the held-out rows' count and, for rows with categories, the headroom
    tables before and after (heldout_headroom_before, heldout_headroom) with the share captured."""
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
        if key in ("dev_accuracy", "dev_step_accuracy"):  # where a stopping rule read the run
            out[key] = value
        if key.startswith("eval_") and key not in ACCURACY_KEYS and not key.startswith(HEADROOM_PREFIX):
            if before is not None and key in before:
                out[f"{key}_before"] = before[key]
            out[key] = value
    after = unflat_headroom(last)
    if after:  # held-out rows with categories: the headroom tables, and the share of it the stage captured
        start = unflat_headroom(before or {})
        if start:
            out["heldout_headroom_before"] = start
        out["heldout_headroom"] = after
        if start:
            out["heldout_headroom_captured"] = {
                row["category"]: {"sampled_accuracy": row["captured_sampled"], "accuracy": row["captured_greedy"]}
                for row in headroom_rows(headroom_summaries(out), {"after": "before"}) if row["stage"] == "after"}
    if heldout is not None:
        out["eval_rows"] = len(heldout.dataset)
    return out


def headroom_summaries(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A run summary's headroom tables as `headroom_rows` reads them: {"before": .., "after": ..}."""
    tables = {"before": summary.get("heldout_headroom_before"), "after": summary.get("heldout_headroom")}
    return {name: {"headroom": table} for name, table in tables.items() if table}
