"""Built-in tasks: seeded generators with disjoint train / held-out splits, extractors and verifiers.

    get_task("arith").rows("preference", split="train", size=1000, seed=0)
    get_task("multistep").verify_steps(completion, steps)   # per-step scores for process supervision

Each task yields rows in the formats it lists in `formats` (SFT as prompt/completion and as chat,
preference pairs, rankings, labelled completions for KTO, verifiable RL prompts; multistep also stepwise
supervision), an
`extract_answer` that reads the answer after any thinking block, and `verify` (exact match of the
extracted answer) usable as an RL reward.
"""

from __future__ import annotations

import difflib

from posttrain.data.tasks.arith import ArithTask
from posttrain.data.tasks.base import SPLITS, Example, Task, answer_text, is_heldout_key
from posttrain.data.tasks.chain import ChainTask
from posttrain.data.tasks.multistep import MultistepTask
from posttrain.data.tasks.sort import SortTask
from posttrain.errors import DataError

_TASKS = (ArithTask(), MultistepTask(), MultistepTask("multistep-long", min_steps=4, max_steps=5), SortTask(),
          ChainTask())
TASKS: dict[str, Task] = {task.name: task for task in _TASKS}


def get_task(name: str) -> Task:
    """The built-in task called `name`; a DataError suggesting the closest name otherwise."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        raise DataError(f"no built-in task {name!r}{hint} Tasks: {', '.join(TASKS)}", field="source")
    return TASKS[name]


__all__ = ["SPLITS", "TASKS", "ArithTask", "ChainTask", "Example", "MultistepTask", "SortTask", "Task", "answer_text",
           "get_task", "is_heldout_key"]
