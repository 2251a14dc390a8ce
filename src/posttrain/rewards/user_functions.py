"""A user's reward function named by its import path, and the batch every reward function reads.

The standard library and `posttrain.messages` only: the child process that runs such a function (`function_process`)
loads this file by its path, without posttrain's heavy packages (torch, transformers, datasets), so that it starts in
milliseconds.

A function takes either posttrain's one argument, `fn(batch: Completions) -> scores` (the batch's `columns` hold
every column of each completion's row), or TRL's `reward_funcs` convention, `fn(prompts, completions, **kwargs)
-> list[float]`: prompts and completions as text for rows whose prompt is text, as messages for conversational
rows, and every other column of the rows as a keyword argument holding one value per completion.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from posttrain.messages import plain_message  # not posttrain.data: the reward child imports this file


@dataclasses.dataclass(frozen=True)
class Completions:
    """What every reward function and step scorer reads, one entry per completion (row order).

    prompts: the prompt of each completion as chat messages; completions: the decoded completion
    texts; answers: the gold answers (None for prompt-only rows); steps: the gold per-step values
    (empty for tasks without); columns: each completion's row as the data file gave it, every column
    (empty when the completions do not come from data rows).
    """

    prompts: list[list[dict[str, Any]]]
    completions: list[str]
    answers: list[str | None]
    steps: list[list[str]]
    columns: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.completions)

    def rows(self, begin: int, end: int) -> Completions:
        """The completions begin..end-1, every field cut alike."""
        return dataclasses.replace(self, **{field.name: getattr(self, field.name)[begin:end]
                                            for field in dataclasses.fields(self)})


# What a user's function returns: one score per completion (a list, a tuple, an array or a tensor).
UserFunction = Callable[[Completions], Any]


def score_alone(fn: Callable[[Completions], Any], batch: Completions, failure: BaseException,
                not_retried: tuple[type[BaseException], ...] = (),
                results: dict[int, Any] | None = None) -> tuple[list[Any], list[str | None]]:
    """The scores of a batch on which `fn` raised `failure`, one row at a time, with each row's error (None where it
    scored): one bad completion of 64 is the error of its row alone. Not retried, every row getting the batch's
    error: a failure of a kind in `not_retried` (a timeout, a crashed process: each row could cost as much), and
    one that rows of two different prompts raise again word for word (the function fails on everything, a service
    is down: each of 512 rows would wait as long). Rows of one prompt do not tell: a group's completions sit side by
    side and share the prompt's row, so one bad row (a missing column) fails them all alike. A row's value is as
    `fn` returned it (None, NaN: judged by the caller); a grader's result gives its score and its own error, and is
    kept whole in `results` (by row) for its parts. An exception's error is its last line (what went wrong) over
    its whole traceback."""
    def text(error: BaseException) -> str:
        full = "".join(traceback.format_exception(error)).rstrip()
        return f"{full.splitlines()[-1]}\n{full}"

    def same(error: BaseException) -> bool:
        return type(error) is type(failure) and str(error) == str(failure)

    count = len(batch)
    if count == 1 or isinstance(failure, not_retried):
        return [0.0] * count, [text(failure)] * count
    # Tried first: the first row and the first row of another prompt (the next row when all share one prompt).
    other = next((row for row in range(1, count) if repr(batch.prompts[row]) != repr(batch.prompts[0])), 1)
    order = [0, other] + [row for row in range(1, count) if row != other]
    values: list[Any] = [0.0] * count
    errors: list[str | None] = [None] * count
    repeats = 0  # how many of the two probe rows failed exactly as the batch did
    for position, row in enumerate(order):
        if repeats == 2:  # rows of two prompts failed as the batch did: so will the others
            errors[row] = text(failure)
            continue
        try:
            returned = fn(batch.rows(row, row + 1))
            error = returned.errors[0] if hasattr(returned, "components") and returned.errors else None
            result = returned.scores if hasattr(returned, "components") else returned
            result = result.tolist() if hasattr(result, "tolist") else result
            listed = list(result) if isinstance(result, (list, tuple)) else [result]
            if len(listed) != 1:
                raise ValueError(f"returned {len(listed)} scores for 1 completion")
            if results is not None:  # kept only once it is one row's result: its parts are that row's
                results[row] = returned
            values[row] = 0.0 if error else listed[0]
            errors[row] = error
        except Exception as err:  # noqa: BLE001 - this row's own error
            errors[row] = text(err)
            repeats += position == repeats and same(err)
    return values, errors


@functools.cache  # a module is imported once per process, however often its function is named
def import_reward_function(path: str) -> UserFunction:
    """The function at `package.module:function` or `path/to/file.py:function`, taking either signature (see
    the module doc). Raises ValueError naming what is missing."""
    module_name, _, attribute = path.rpartition(":")
    if not module_name or not attribute:
        raise ValueError(f"{path!r} is not an import path: use package.module:function or file.py:function")
    file = Path(module_name).expanduser() if module_name.endswith(".py") or "/" in module_name else None
    if file is not None and not file.is_file():
        raise ValueError(f"reward function file {module_name} not found")
    try:
        if file is not None:
            name = f"posttrain_user_reward_{hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]}"
            spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses and pickling look a module up by name
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as err:  # the user's module failed to import: say which and why, once, at start-up
        raise ValueError(f"cannot import the reward function module {module_name!r}: "
                         f"{type(err).__name__}: {err}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"{module_name} has no function {attribute!r} (it has: {', '.join(found) or 'none'})")
    return trl_style(function) if _takes_trl_arguments(function) else function


def _takes_trl_arguments(function: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature: posttrain's one-argument form
        return False
    return "completions" in parameters or "prompts" in parameters


def trl_style(function: Callable[..., Sequence[float]]) -> UserFunction:
    """Adapt a reward function of TRL's convention, `fn(prompts, completions, **columns)`, to a batch."""
    parameters = inspect.signature(function).parameters
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())

    def score(batch: Completions) -> Sequence[float]:
        rows = batch.columns or [{} for _ in range(len(batch))]
        # TRL's two kinds of rows: text prompt -> text in and out; conversational -> messages in and out.
        texts = [isinstance(row.get("prompt"), str) or not row for row in rows]
        prompts = [row.get("prompt", p[-1]["content"]) if text else [plain_message(m) for m in p]
                   for row, p, text in zip(rows, batch.prompts, texts, strict=True)]
        completions = [c if text else [{"role": "assistant", "content": c}]
                       for c, text in zip(batch.completions, texts, strict=True)]
        names = sorted({k for row in rows for k in row} - {"prompt", "completion"})
        clash = sorted({"prompts", "completions"} & set(names))
        if clash:  # TypeError "got multiple values for keyword argument" otherwise, as in TRL
            raise ValueError(f"the rows have a column {clash[0]!r}, the name TRL's convention passes the "
                             f"{clash[0]} in: rename that column in the data")
        columns = {name: [row.get(name) for row in rows] for name in names}
        if not any_keyword:
            columns = {k: v for k, v in columns.items() if k in parameters}
        return function(prompts=prompts, completions=completions, **columns)

    score.__name__ = getattr(function, "__name__", "reward")
    return score
