"""Held-out exact-match accuracy: greedy completions of distinct held-out problems, with a 95% CI."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.config import param
from posttrain.data.config import DataConfig
from posttrain.data.tasks import TASKS, get_task
from posttrain.data.tasks.base import Example, Task
from posttrain.data.tokenize import Encoder
from posttrain.errors import ConfigError
from posttrain.rollout import make_engine
from posttrain.rollout.base import SamplingParams
from posttrain.train.progress import SILENT, Phase


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    task: str | None = param(None, "Built-in task whose held-out problems are scored by exact match (None: the "
                                   "training task when data.source is a built-in task, else none).")
    problems: int = param(500, "Held-out problems generated greedily, of the task and of held-out prompts "
                               "scored by the stage's rewards (0: no generation-based evaluation).", ge=0)
    source: str | None = param(None, "Held-out rows in the training data's format (a file or `datasets` "
                                     "directory), evaluated with the stage's own loss or rewards; or use "
                                     "data.eval_split.")
    seed: int = param(1234, "Seed for drawing the held-out problems.", ge=0)
    dev_problems: int = param(0, "Built-in task: problems of a second held-out draw, none of them among the "
                                 "held-out problems, scored greedily at every evaluation as dev_accuracy and "
                                 "dev_step_accuracy (what train.stop_when can read without choosing on the "
                                 "problems the run is judged on); the held-out problems are then scored only "
                                 "where the run ends. The draw is kept apart from the first eval.problems "
                                 "held-out problems only: score the run later on no more of them (0: off).",
                              ge=0)
    max_new_tokens: int = param(24, "Generation budget per answer of the task.", ge=1)
    batch_size: int = param(128, "Prompts generated together.", ge=1)
    samples: int = param(8, "Greedy completions written to samples.jsonl at each evaluation.", ge=0)
    headroom_samples: int = param(8, "Held-out rows with a `category` column: completions per prompt sampled at "
                                     "temperature 1 for the headroom per category (greedy and sampled accuracy, "
                                     "pass@n, share with 0 < p < 1), before and after (0: off).", ge=0)
    correct_by: str | None = param(None, "The reward function whose score decides whether a held-out completion is "
                                         "correct (None: `correct` when the stage has it, else the weighted total).")
    correct_threshold: float = param(1.0, "A held-out completion is correct when that score reaches this.")


def eval_task(cfg: EvalConfig, data: DataConfig) -> str | None:
    """The built-in task scored by exact match: eval.task, else the training task when the data is a built-in
    task, else None (a user's own data is evaluated on its own held-out rows, never on a task it is not)."""
    if cfg.problems == 0:
        return None
    return cfg.task or (data.source if data.source in TASKS else None)


@dataclasses.dataclass(frozen=True)
class Accuracy:
    accuracy: float
    ci_low: float
    ci_high: float
    problems: int
    samples: list[dict[str, Any]]
    step_accuracy: float | None = None
    """Tasks solved in steps: the share of all gold steps that the completions get right."""
    completion_length: float = 0.0
    """Mean tokens per greedy completion (EOS included)."""
    correct: tuple[bool, ...] = ()
    """Per problem, in the order of `heldout_problems`: whether its greedy completion is right."""
    steps_right: tuple[float, ...] = ()
    """Tasks solved in steps, per problem in the same order: the share of its gold steps computed right."""

    def metrics(self, prefix: str = "eval_") -> dict[str, float]:
        steps = {} if self.step_accuracy is None else {f"{prefix}step_accuracy": self.step_accuracy}
        return {f"{prefix}accuracy": self.accuracy, f"{prefix}accuracy_ci_low": self.ci_low,
                f"{prefix}accuracy_ci_high": self.ci_high, **steps}


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (well-behaved near 0 and 1, unlike p ± z·se)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_interval(before: list[float], after: list[float], z: float = 1.959964) -> tuple[float, float, float]:
    """Mean change after - before over the same problems, with its 95% interval from the per-problem differences
    d_i = after_i - before_i (values in [0, 1]: right or not, or a share of samples or steps right; the paired
    comparison, each problem its own control, so the interval is far narrower than that of two independent
    accuracies).

    The interval is Bonett & Price's adjusted Wald interval: mean(d') +- z sd(d') / sqrt(n + 2) over the
    differences with one pseudo-difference of +1 and one of -1 added (sd over n + 2: for 0/1 values exactly their
    interval for paired proportions). The plain mean +- z sd / sqrt(n) has no width when every difference is equal:
    2 problems both flipped read "+100% (+100% to +100%)", a gain whose interval excludes 0; here they read
    (-35% to +100%). At the demo's 500 problems the two differ by a few tenths of a point. Clipped to [-1, 1].
    Source: Bonett & Price (2012), "Adjusted Wald Confidence Interval for a Difference of Binomial Proportions
    Based on Paired Data", J. Educational and Behavioral Statistics 37(4).
    """
    if len(before) != len(after) or not before:
        raise ValueError(f"a paired interval needs the same problems before and after, got {len(before)} and "
                         f"{len(after)}")
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    n = len(diffs)
    adjusted = [*diffs, 1.0, -1.0]
    centre = sum(adjusted) / (n + 2)
    variance = sum(d * d for d in adjusted) / (n + 2) - centre * centre
    half = z * math.sqrt(max(variance, 0.0) / (n + 2))
    return sum(diffs) / n, max(-1.0, centre - half), min(1.0, centre + half)


STALL_DRAWS = 20_000  # draws without a new problem after which a task counts as out of held-out problems


def heldout_problems(task: Task, count: int, seed: int, exclude: frozenset[str] = frozenset(),
                     field: str = "eval.problems") -> list[Example]:
    """`count` held-out examples with distinct problems (a problem drawn twice would count twice), none of them with
    a key in `exclude`; a ConfigError naming `field` where the task has fewer."""
    seen: dict[str, Example] = {}
    last_new = 0
    for drawn, example in enumerate(task.examples("heldout", size=(count + len(exclude)) * 50, seed=seed)):
        if example.key not in exclude and example.key not in seen:
            seen[example.key], last_new = example, drawn
        if len(seen) == count:
            return list(seen.values())
        if drawn - last_new > max(STALL_DRAWS, 20 * len(seen)):  # the task has run out of new problems
            break
    raise ConfigError(f"task {task.name!r} has fewer than {count} distinct held-out problems: ask for fewer",
                      field=field)


# The dev draw's seed is the held-out draw's plus this; its problems are kept apart from those by key.
DEV_SEED_OFFSET = 1_000_003


def dev_problems(task: Task, count: int, heldout: int, seed: int) -> list[Example]:
    """`count` distinct held-out-split problems, none of them among the first `heldout` of `heldout_problems(task,
    heldout, seed)`: a dev set to choose on (a stopping step, a setting) without touching the test problems."""
    test = frozenset(e.key for e in heldout_problems(task, heldout, seed)) if heldout else frozenset()
    try:
        return heldout_problems(task, count, seed + DEV_SEED_OFFSET, exclude=test)
    except ConfigError:
        raise ConfigError(f"task {task.name!r} has fewer than {count} distinct held-out problems besides the "
                          f"{heldout} evaluated ones: lower eval.dev_problems", field="eval.dev_problems") from None


@torch.no_grad()
def heldout_accuracy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: DataConfig,
                     cfg: EvalConfig, bar: Phase = SILENT, examples: list[Example] | None = None) -> Accuracy:
    """Greedy exact-match accuracy on `cfg.problems` distinct held-out problems of `cfg.task` (or on `examples`
    of it, e.g. `dev_problems`).

    Prompts are rendered exactly as training renders them (`data`: template, thinking switch). `bar` advances
    by the problems of each generation batch.
    """
    if cfg.task is None:
        raise ValueError("heldout_accuracy needs a task (eval_task resolves the default)")
    task = get_task(cfg.task)
    if examples is None:
        examples = heldout_problems(task, cfg.problems, cfg.seed)
    encoder = Encoder.from_config(tokenizer, data)
    prompts = [encoder.encode_prompt([{"role": "user", "content": e.prompt}]) for e in examples]
    engine = make_engine("local", model, tokenizer)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    was_training = model.training
    model.eval()
    texts: list[str] = []
    tokens = 0
    for start in range(0, len(prompts), cfg.batch_size):
        rollout = engine.generate(prompts[start:start + cfg.batch_size], params)
        texts += rollout.texts
        tokens += int(rollout.completion_lengths.sum())
        bar.advance(len(rollout.texts))
    model.train(was_training)
    correct = [task.verify(text, e.answer) for text, e in zip(texts, examples, strict=True)]
    hits = int(sum(correct))
    low, high = wilson_interval(hits, len(examples))
    samples = [{"prompt": e.prompt, "completion": t, "answer": e.answer, "correct": bool(c)}
               for e, t, c in list(zip(examples, texts, correct, strict=True))[:cfg.samples]]
    return Accuracy(accuracy=hits / len(examples), ci_low=low, ci_high=high, problems=len(examples), samples=samples,
                    step_accuracy=step_accuracy(task, examples, texts), completion_length=tokens / len(examples),
                    correct=tuple(bool(c) for c in correct),
                    steps_right=steps_right(step_scores(task, examples, texts)))


def step_scores(task: Task, examples: list[Example], texts: list[str]) -> list[list[float]]:
    """Per problem, the score of each of its gold steps (`verify_steps`); [] for a task without steps."""
    verify_steps = getattr(task, "verify_steps", None)
    if verify_steps is None or not any(e.steps for e in examples):
        return []
    return [verify_steps(t, list(e.steps)) for e, t in zip(examples, texts, strict=True)]


def steps_right(scores: list[list[float]]) -> tuple[float, ...]:
    """Per problem, the share of its steps right; () unless every problem has steps (so it stays aligned)."""
    return tuple(sum(s) / len(s) for s in scores) if scores and all(scores) else ()


def step_accuracy(task: Task, examples: list[Example], texts: list[str]) -> float | None:
    """Share of all gold steps computed right (`verify_steps`), or None for a task without steps."""
    scores = [s for problem in step_scores(task, examples, texts) for s in problem]
    return sum(scores) / len(scores) if scores else None
