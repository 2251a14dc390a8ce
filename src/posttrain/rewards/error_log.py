"""Reward and grader errors made visible: every error of a run kept in `grader_errors.jsonl`, the first of each
kind printed with its traceback and the sample, and a run whose rewards are mostly errors stopped.

An error (a grader that raises, times out or returns NaN; a reward function that raises or returns NaN)
scores its row 0 for that function, so a broken grader would otherwise train to the end on reward 0.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.data.schemas import prompt_as_given
from posttrain.errors import ConfigError

if TYPE_CHECKING:
    from posttrain.rewards.functions import Completions, Scores

ERRORS_FILE = "grader_errors.jsonl"


class RewardErrorLog:
    """Attached to a `WeightedRewards` (`rewards.error_log = RewardErrorLog(run_dir, ...)`), it sees every scored
    batch: appends its errors to `<run_dir>/grader_errors.jsonl` (with the call number, the function, the row,
    the prompt's last message, the completion and the full error), prints the first error of each kind (function
    and exception type), and raises ConfigError when one function errs on more than `max_error_fraction` of a
    batch's rows."""

    def __init__(self, run_dir: str | Path | None, max_error_fraction: float = 0.5,
                 echo: Callable[[str], None] | None = None, *, setting: str = "reward.functions",
                 unkept: str | None = None) -> None:
        """`setting`: what named the functions (a run's reward.functions, eval's --reward); `unkept`: why errors are
        not kept in a file, where there is none to keep them (None: a run's, whose directory is not written yet)."""
        self.path = Path(run_dir) / ERRORS_FILE if run_dir is not None else None
        self.max_error_fraction = max_error_fraction
        self.setting, self.unkept = setting, unkept
        self.echo = echo or (lambda text: print(text, file=sys.stderr, flush=True))
        self.seen: set[tuple[str, str]] = set()
        self.calls = 0
        self.step: int | None = None  # the optimizer step the scored samples train (set by the stage's sampler)
        self.pending: list[dict[str, Any]] = []  # errors scored before the run directory exists (see `attach`)
        self.deferred = False  # the caller checks the error fraction itself (`check_fraction`)
        self.unchecked: list[dict[str, Any]] = []  # under torchrun (`take_unchecked`)
        self.unchecked_rows = 0
        # Under torchrun every rank scores its own samples and appends its own errors to the one file.
        self.rank = int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None

    def attach(self, run_dir: str | Path) -> None:
        """Keep errors in `<run_dir>/grader_errors.jsonl` from now on, with those scored before it existed
        (offline RFT scores its whole data set before anything on disk is touched)."""
        self.path = Path(run_dir) / ERRORS_FILE
        self._append(self.pending)
        self.pending = []

    def _append(self, records: list[dict[str, Any]]) -> None:
        """One write with O_APPEND: the lines of ranks writing at once never interleave."""
        if records and self.path is not None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, "".join(json.dumps(r) + "\n" for r in records).encode())
            finally:
                os.close(fd)

    def __call__(self, scores: Scores, batch: Completions) -> None:
        self.calls += 1
        judged_later = self.rank is not None and not self.deferred  # with every rank's (`take_unchecked`)
        if judged_later:
            self.unchecked_rows += len(batch)
        if not scores.errors:
            return
        records = [{"call": self.calls, **({"step": self.step} if self.step is not None else {}),
                    **({"rank": self.rank} if self.rank is not None else {}),
                    "function": e["function"], "row": e["row"], "prompt": prompt_as_given(batch.prompts[e["row"]]),
                    "completion": batch.completions[e["row"]], "error": e["error"]} for e in scores.errors]
        if self.path is not None:
            self._append(records)
        else:
            self.pending.extend(records)
        for record in records:
            kind = (record["function"], _kind(record["error"]))
            if kind not in self.seen:
                self.seen.add(kind)
                kept = self.path or self.unkept or f"the run directory's {ERRORS_FILE} once it is written"
                self.echo(f"reward {record['function']!r} failed on a sample (scored 0; every error is kept in "
                          f"{kept}):\n  prompt: {record['prompt']!r}\n  completion: "
                          f"{record['completion']!r}\n{record['error']}")
        if judged_later:
            self.unchecked.extend({"function": r["function"], "error": r["error"]} for r in records)
        elif not self.deferred:
            self.check_fraction(records, len(batch))

    def take_unchecked(self) -> tuple[list[dict[str, Any]], int]:
        """Under torchrun: the errors (function and error) and the count of the rows scored since the last call,
        for the stage to judge with every rank's once a round is scored (`recipes.rl.check_reward_errors`): a rank
        that stopped alone on its own batch left the others waiting in a collective, to die with gloo's traceback."""
        taken = self.unchecked, self.unchecked_rows
        self.unchecked, self.unchecked_rows = [], 0
        return taken

    def check_fraction(self, errors: list[dict[str, Any]], rows: int, scope: str = "this batch") -> None:
        """ConfigError when one function erred on more than `max_error_fraction` of `rows` scored rows (`errors`:
        records with "function" and "error"). Called on every batch, or with `deferred` set, by the caller on the
        whole of what it scored in several batches (a set shared out over ranks is judged whole on each), or under
        torchrun on a round's rows of every rank (`scope` says which)."""
        for function in sorted({e["function"] for e in errors}):
            failed = [e for e in errors if e["function"] == function]
            if len(failed) > self.max_error_fraction * rows:
                raise ConfigError(f"{len(failed)} of {rows} scores of {scope} are errors (more than "
                                  f"reward.max_error_fraction={self.max_error_fraction:g}); the first: "
                                  f"{failed[0]['error'].splitlines()[0]} ("
                                  + (f"all in {self.path}" if self.path else (self.unkept or "before the run "
                                     "directory was written: none kept") + ", the first of each kind printed above")
                                  + ")",
                                  field=f"{self.setting}.{function}")


def _kind(error: str) -> str:
    """The exception type (or the first words of the message) of an error record."""
    first = error.splitlines()[0] if error else ""
    return first.split(":", 1)[0] if ":" in first else first[:40]
