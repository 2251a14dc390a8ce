"""Reward functions for RL stages, and their weighted combination.

A reward function reads a batch of `Completions` (prompts, completion texts, gold answers and
steps) and returns one score per completion. The built-ins are

    correct       1 when the task's extracted answer equals the gold answer, else 0 (`Task.verify`)
    format        1 when the task can extract an answer at all (the completion is well-formed)
    steps         share of the gold steps the completion gets right (`Task.verify_steps`, partial credit)
    reward_model  the score of a reward model trained by `posttrain rm`
    grader        a grader file (`posttrain.rewards.graders`): partial credit in [0, 1]

and any Python callable registered with `@register_reward_function("name")` or named by its import
path, `package.module:function` or `path/to/file.py:function`. A recipe names the functions and
their weights in its config (`reward.functions: {correct: 1.0, format: 0.1}`) and gets the total
reward r = sum_k w_k f_k(completion), with every f_k kept for the logs. Scores of functions may be
any finite numbers (graders' are partial credit in [0, 1]).

A function takes either posttrain's one argument, `fn(batch: Completions) -> scores`, or TRL's
`reward_funcs` convention, `fn(prompts, completions, **columns) -> list[float]` (`user_functions`).
Functions named by import path run in a child process of their own with a hard time limit per call of up
to 512 completions (`reward.timeout_s`; `function_process`): a call that raises, hangs or crashes scores its
rows 0 with an error record each, and the run goes on or stops by `reward.max_error_fraction`.
`reward.in_process=true` runs them in the trainer's process instead (no limit), for a function that must
share its memory; `__main__:function` always runs there.
Functions registered with the decorator are code of the trainer's own process and run in it; graders,
which arrive as data files, run sandboxed.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pyarrow.compute as pc
import torch
from torch import Tensor

from posttrain.algos import Registry
from posttrain.data.columns import arrow_column, column_values, with_items
from posttrain.data.tasks.base import Task
from posttrain.data.tokenize import RowProblem
from posttrain.errors import ConfigError
from posttrain.rewards.function_process import DEFAULT_TIMEOUT_S, ChildExited, PartScores, user_function_process
from posttrain.rewards.graders.base import GradeResult
from posttrain.rewards.user_functions import Completions, import_reward_function, score_alone

RewardFunction = Callable[[Completions], Sequence[float] | Tensor]
# A factory builds a reward function from the recipe's context (the task, the reward model path).
RewardFactory = Callable[..., RewardFunction]

logger = logging.getLogger("posttrain.rewards")
REWARD_FUNCTIONS: Registry[RewardFactory] = Registry("reward function")


def register_reward_function(name: str) -> Callable[[RewardFunction], RewardFunction]:
    """Register a plain reward function `fn(completions: Completions) -> scores` under `name`.

        @register_reward_function("short")
        def short(batch):
            return [1.0 if len(text) < 20 else 0.0 for text in batch.completions]

    after which `reward.functions.short=0.5` adds it to a recipe's reward.
    """

    def decorate(fn: RewardFunction) -> RewardFunction:
        # The factory carries fn's module and name: the registry tells the same function defined again (a
        # notebook cell run again), which replaces it, from another one under a name already taken.
        REWARD_FUNCTIONS.register(name)(functools.update_wrapper(lambda **_: fn, fn))
        return fn

    return decorate


# The built-in functions that compare a completion with its row's gold answer: prompt-only data cannot use them.
NEEDS_ANSWER = ("correct", "steps")


def reward_function(name: str, **context: Any) -> RewardFunction:
    """The function a `reward.functions` key names: a registered name, or an import path (`module:function`),
    run in a child process with `context["timeout_s"]` per call, or in this one with `context["in_process"]` (and
    always for `__main__:function`, which exists only in this process)."""
    timeout_s, in_process = context.pop("timeout_s", None), context.pop("in_process", False)
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name](**context)
    if ":" in name:
        if in_process or name.rpartition(":")[0] == "__main__":
            fn = import_reward_function(name)
            # A batch of its own, as a child process's function gets one: a function that edits its arguments (strips
            # the completions in place) changed what the next function scored and what samples.jsonl kept.
            return functools.wraps(fn)(lambda batch: fn(copy.deepcopy(batch)))
        return user_function_process(name, float(timeout_s or DEFAULT_TIMEOUT_S))
    return REWARD_FUNCTIONS[name](**context)  # the registry's own error, with the names it has


@REWARD_FUNCTIONS.register("correct")
def correct_reward(task: Task | None = None, **_: Any) -> RewardFunction:
    """Exact match of the extracted answer with the gold answer (the verifiable reward of RLVR)."""
    task = _need_task(task, "correct")
    return lambda batch: [task.verify(c, a) for c, a in zip(batch.completions, batch.answers, strict=True)]


@REWARD_FUNCTIONS.register("format")
def format_reward(task: Task | None = None, **_: Any) -> RewardFunction:
    """1 when an answer can be read out of the completion, right or wrong (a shaping term)."""
    task = _need_task(task, "format")
    return lambda batch: [float(task.extract_answer(c) is not None) for c in batch.completions]


@REWARD_FUNCTIONS.register("steps")
def steps_reward(task: Task | None = None, **_: Any) -> RewardFunction:
    """Partial credit: the share of the gold steps the completion computes correctly."""
    task = _need_task(task, "steps")
    verify_steps = getattr(task, "verify_steps", None)
    if verify_steps is None:
        raise ValueError(f"task {task.name!r} has no step verifier: the `steps` reward needs one (e.g. multistep)")

    def score(batch: Completions) -> list[float]:
        out = []
        for completion, steps in zip(batch.completions, batch.steps, strict=True):
            scores = verify_steps(completion, steps)
            out.append(sum(scores) / len(scores) if scores else 0.0)
        return out

    return score


@REWARD_FUNCTIONS.register("coin")
def coin_reward(**_: Any) -> RewardFunction:
    """1 or 0, each with probability 1/2, whatever the completion says: the random-reward control of an RL run
    (what the same updates do without information). A hash of the prompt, the completion and its row in the
    batch, so a rerun or a resumed run gets the same coins, and equal completions of a group different ones."""

    def score(batch: Completions) -> list[float]:
        return [float(hashlib.blake2b(f"{i}\x00{prompt}\x00{completion}".encode(), digest_size=1).digest()[0] & 1)
                for i, (prompt, completion) in enumerate(zip(batch.prompts, batch.completions, strict=True))]

    return score


@REWARD_FUNCTIONS.register("reward_model")
def reward_model_reward(reward_model_path: str | None = None, **_: Any) -> RewardFunction:
    """The scalar score of a reward model (`posttrain rm`) for each (prompt, completion); a completion it cannot
    score (special-token text) is an error of its row alone, and so is a score that is not finite (a diverged
    model's NaN was a silent 0, its inf a huge finite reward)."""
    if not reward_model_path:
        raise ValueError("the `reward_model` reward needs the reward model's directory (reward.model_path)")
    from posttrain.rewards.reward_model import RewardModelScorer

    scorer = RewardModelScorer.from_pretrained(reward_model_path)

    def score(batch: Completions) -> GradeResult:
        # a row it cannot score: an error; each prompt rendered with its row's tools, as the rows trained on
        values, errors = scorer.score_rows(batch.prompts, batch.completions, [c.get("tools") for c in batch.columns])
        errors = [error if error is not None or value.isfinite() else f"the reward model scored it {value.item()!r}"
                  for value, error in zip(values, errors, strict=True)]
        return GradeResult([0.0 if error else value for value, error in zip(values.tolist(), errors, strict=True)],
                           errors=errors)

    score.grades = True  # its results are a grader's (`_row_by_row`)
    score.check_rows = functools.partial(warn_of_unrenderable_rows, scorer)  # at start-up (`check_grader_rows`)
    return score


def warn_of_unrenderable_rows(scorer: Any, dataset: Any) -> None:
    """Warn, before anything is sampled, of the prompt rows the reward model's chat template cannot render (a
    `tool` turn for a template without that role): every completion of those rows is an error in every round, and
    the rows are left out of training. One row of each kind of conversation (its roles, with or without tools) is
    rendered, found in Arrow, so a large data set costs a few renders."""
    if not len(dataset) or "prompt" not in dataset.column_names:
        return
    prompts = arrow_column(dataset, "prompt").combine_chunks()
    roles = with_items(prompts, prompts.flatten().field("role"))
    tools = arrow_column(dataset, "tools").combine_chunks() if "tools" in dataset.column_names else None
    kinds = pc.binary_join(roles, ",")
    if tools is not None:
        kinds = pc.binary_join_element_wise(kinds, pc.if_else(tools.is_null(), "", "tools"), "|")
    failed = []
    for kind in pc.unique(kinds).to_pylist():
        first = pc.index(kinds, kind).as_py()
        row = dataset[first]
        try:
            scorer.encode(row["prompt"], "x", row.get("tools"))
        except RowProblem as problem:
            failed.append((kind.split("|")[0], row.get("line", first + 1), str(problem)))
    for roles_of, line, problem in failed:
        logger.warning("the reward model cannot render rows whose prompt has the turns %s (line %s, and every row "
                       "like it): %s; their completions will be errors in every round, left out of training",
                       roles_of, line, problem)


@REWARD_FUNCTIONS.register("grader")
def grader_reward(grader_path: str | None = None, **_: Any) -> RewardFunction:
    """A grader file (`posttrain.rewards.graders`): partial credit in [0, 1], with its inner graders' scores
    and its error count logged beside the total."""
    if not grader_path:
        raise ValueError("the `grader` reward needs a grader file or shipped grader name (reward.grader)")
    from posttrain.rewards.graders import completion_records, load_grader

    grader = load_grader(grader_path)

    def score(batch: Completions):
        samples, items = completion_records(batch.prompts, batch.completions, batch.answers, batch.steps,
                                            batch.columns)
        return grader.grade(samples, items)

    score.grader = grader  # for the start-up check of its templates against the data (check_grader_fields)
    score.grades = True  # its results are a grader's (`_row_by_row`)
    return score


def _row_by_row(fn: RewardFunction, batch: Completions, failure: Exception, graded: bool) -> GradeResult | PartScores:
    """The scores of a batch on which `fn` raised, one row at a time (`user_functions.score_alone`), with each row's
    error: the rows it fails on are its errors and the others keep their scores (one bad completion of 64 must not
    score the whole batch 0, nor stop the run as if every sample failed). A grader's rows (`graded`, or rows
    that gave a grader's result) are one grader's result with its parts, as for a batch graded whole (a part is 0
    where its row failed)."""
    results: dict[int, Any] = {}
    values, errors = score_alone(fn, batch, failure, not_retried=(TimeoutError, ChildExited), results=results)
    rows = {row: result for row, result in results.items() if hasattr(result, "components")}
    if not (graded or rows):
        return PartScores(values, errors)

    def part_score(row: int, part: str) -> float:
        result = rows.get(row)
        return result.components[part][0] if result is not None and part in result.components else 0.0

    parts = dict.fromkeys(part for result in rows.values() for part in result.components)
    return GradeResult(values, {part: [part_score(row, part) for row in range(len(batch))] for part in parts},
                       errors)


def _need_task(task: Task | None, name: str) -> Task:
    if task is None:
        raise ValueError(f"the `{name}` reward needs a task to verify answers with (reward.task)")
    return task


@dataclasses.dataclass(frozen=True)
class Scores:
    """total: [B] weighted sum of the reward functions; by_function: each function's raw scores [B] (and a
    grader's inner scores and 0/1 error flags as `<name>.<part>`); errors: one record per grader error
    ({"function", "row", "error"}): those rows scored 0 for that function."""

    total: Tensor
    by_function: dict[str, Tensor]
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @classmethod
    def concat(cls, parts: Sequence[Scores]) -> Scores:
        """The scores of several batches, rows in order (error rows counted on). A name some batch lacks (a grader's
        part, where every row of that batch failed before the grader's parts were seen) is 0 on its rows."""
        offsets = [0]
        for part in parts:
            offsets.append(offsets[-1] + len(part.total))
        names = dict.fromkeys(name for part in parts for name in part.by_function)
        return cls(total=torch.cat([p.total for p in parts]),
                   by_function={name: torch.cat([p.by_function.get(name, torch.zeros_like(p.total)) for p in parts])
                                for name in names},
                   errors=[{**e, "row": e["row"] + offset} for p, offset in zip(parts, offsets[:-1], strict=True)
                           for e in p.errors])

    def failed(self) -> Tensor:
        """[B] bool: the rows some function failed to score (their 0 for it is no score: nothing to compare or
        select by)."""
        mask = torch.zeros(len(self.total), dtype=torch.bool)
        mask[[e["row"] for e in self.errors]] = True
        return mask

    def select(self, rows: Sequence[int]) -> Scores:
        """The scores of these rows, in this order (error rows renumbered, those of other rows dropped)."""
        new_row = {old: new for new, old in enumerate(rows)}
        index = torch.as_tensor(list(rows), dtype=torch.long)
        return Scores(total=self.total[index], by_function={k: v[index] for k, v in self.by_function.items()},
                      errors=[{**e, "row": new_row[e["row"]]} for e in self.errors if e["row"] in new_row])


class WeightedRewards:
    """r = sum_k w_k f_k(completion) over named reward functions f_k with weights w_k.

    Built from names (`from_config`) or directly from callables: `WeightedRewards({"mine": (fn, 1.0)})`.
    Scores are float64 so a weighted sum of 0/1 rewards stays exact and equal rewards stay equal
    (a group with equal rewards must get exactly zero advantage).
    """

    def __init__(self, functions: Mapping[str, tuple[RewardFunction, float]]) -> None:
        if not functions:
            raise ValueError("at least one reward function is needed")
        self.functions = dict(functions)
        self._said_none: set[str] = set()  # the functions whose all-None batch was warned about
        self._parts: dict[str, dict[str, None]] = {}  # each grader's parts seen so far (ordered)
        # Set by a recipe once its run directory exists: sees every scored batch (`error_log.RewardErrorLog`).
        self.error_log: Callable[[Scores, Completions], None] | None = None

    @classmethod
    def from_config(cls, weights: Mapping[str, float], **context: Any) -> WeightedRewards:
        """Look every name up in `REWARD_FUNCTIONS` (or import it: `module:function`); `context` (task,
        reward_model_path) goes to the factories."""
        return cls({name: (reward_function(name, **context), float(w)) for name, w in weights.items()})

    def check_grader_columns(self, columns: Sequence[str] | Mapping[str, Any],
                             answers: Iterable[str | None] | None = None,
                             steps: Iterable[Sequence[str] | None] | None = None) -> None:
        """A ConfigError at start-up when a grader's template reads a field the data's rows (`columns`) lack, or
        the rows' gold `answers` or `steps` (where given) when no row has one."""
        from posttrain.rewards.graders import absent_item_fields, check_grader_fields

        graders = self._graders()
        absent = absent_item_fields(answers, steps) if graders else ()
        for grader in graders:
            check_grader_fields(grader, columns, absent)

    def check_grader_rows(self, dataset: Any) -> None:
        """`check_grader_columns` against prepared verifiable rows (a `datasets.Dataset` with `row`, `answer` and
        `steps`): the first row's columns as given, and every row's answer and steps, read only for a grader."""
        if len(dataset) and "row" in dataset.column_names and self._graders():
            self.check_grader_columns(json.loads(dataset[0]["row"] or "{}"), column_values(dataset, "answer"),
                                      column_values(dataset, "steps"))
        for fn, _ in self.functions.values():  # a reward model's chat template against the rows' turns
            if getattr(fn, "check_rows", None) is not None:
                fn.check_rows(dataset)

    def _graders(self) -> list[Any]:
        return [fn.grader for fn, _ in self.functions.values() if getattr(fn, "grader", None) is not None]

    def __call__(self, batch: Completions) -> Scores:
        """A function that raises on a batch is called again row by row (`_row_by_row`): a row it raises on, and
        a NaN, score 0 on that row with an error record (with the traceback), like a grader's errors; a timeout or
        a crashed process scores every row 0 so. A None is no score (the function does not apply to the row): it
        adds 0 to the total, as in TRL, and is no error (a batch of None only is warned about once)."""
        by_function: dict[str, Tensor] = {}
        errors: list[dict[str, Any]] = []
        total = torch.zeros(len(batch), dtype=torch.float64)
        for name, (fn, weight) in self.functions.items():
            try:
                values = fn(batch)
            except Exception as err:  # noqa: BLE001 - the user's function failed: error records, not a dead run
                values = _row_by_row(fn, batch, err, graded=name in self._parts or getattr(fn, "grades", False))
            if hasattr(values, "components"):  # a grader's result: log its parts and errors, weight its total
                by_function.update({f"{name}.{part}": torch.tensor(v, dtype=torch.float64)
                                    for part, v in values.components.items()})
                by_function[f"{name}.errors"] = torch.tensor([e is not None for e in values.errors],
                                                             dtype=torch.float64)
                # A part a batch lacks (every row of it failed one at a time) scores 0 there, so that each batch
                # logs the same names (batches are concatenated and averaged by name)
                known = self._parts.setdefault(name, {})
                known.update(dict.fromkeys(values.components))
                by_function.update({f"{name}.{part}": torch.zeros(len(batch), dtype=torch.float64)
                                    for part in known if part not in values.components})
            if hasattr(values, "errors"):  # a grader's result, or a user function's batch sent in parts
                errors.extend({"function": name, "row": i, "error": e}
                              for i, e in enumerate(values.errors) if e is not None)
                values = values.scores
            if isinstance(values, (list, tuple)) and any(v is None for v in values):
                # None: the function does not apply to that completion (TRL's convention, where the total is a
                # nansum): it adds nothing to the total, and it is not an error
                if all(v is None for v in values) and name not in self._said_none:
                    self._said_none.add(name)
                    logger.warning("reward %r returned None for every completion of a batch (it applies to none "
                                   "of them): it adds 0 to their rewards", name)
                values = [0.0 if v is None else v for v in values]
            try:
                values = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
            except (TypeError, ValueError, RuntimeError, OverflowError) as err:
                raise ConfigError(f"must return one number (or None) per completion ({err})",
                                  field=f"reward.functions.{name}") from None
            if values.numel() != len(batch):  # a fault of the function, not of a row: stop with a one-line error
                raise ConfigError(f"returned {values.numel()} scores for {len(batch)} completions",
                                  field=f"reward.functions.{name}")
            bad = ~torch.isfinite(values)
            errors.extend({"function": name, "row": i, "error": f"returned {values[i].item()!r}, not a finite number"}
                          for i in bad.nonzero().flatten().tolist())
            values = torch.where(bad, 0.0, values)
            by_function[name] = values
            total += weight * values
        scores = Scores(total=total, by_function=by_function, errors=errors)
        if self.error_log is not None:
            self.error_log(scores, batch)
        return scores
