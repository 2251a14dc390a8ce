"""Reward and grader errors made visible: every error of a run kept in `grader_errors.jsonl`, the first of each
kind printed with its traceback and the sample, and a run whose rewards are mostly errors stopped.

An error (a grader that raises, times out or returns NaN; a reward function that raises or returns NaN)
scores its row 0 for that function, so a broken grader would otherwise train to the end on reward 0.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
                 echo: Callable[[str], None] | None = None) -> None:
        self.path = Path(run_dir) / ERRORS_FILE if run_dir is not None else None
        self.max_error_fraction = max_error_fraction
        self.echo = echo or (lambda text: print(text, file=sys.stderr, flush=True))
        self.seen: set[tuple[str, str]] = set()
        self.calls = 0

    def __call__(self, scores: Scores, batch: Completions) -> None:
        self.calls += 1
        if not scores.errors:
            return
        records = [{"call": self.calls, "function": e["function"], "row": e["row"],
                    "prompt": _last_message(batch.prompts[e["row"]]), "completion": batch.completions[e["row"]],
                    "error": e["error"]} for e in scores.errors]
        if self.path is not None:
            with self.path.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        for record in records:
            kind = (record["function"], _kind(record["error"]))
            if kind not in self.seen:
                self.seen.add(kind)
                self.echo(f"reward {record['function']!r} failed on a sample (scored 0; every error is kept in "
                          f"{self.path or ERRORS_FILE}):\n  prompt: {record['prompt']!r}\n  completion: "
                          f"{record['completion']!r}\n{record['error']}")
        for function in sorted({r["function"] for r in records}):
            failed = [r for r in records if r["function"] == function]
            if len(failed) > self.max_error_fraction * len(batch):
                raise ConfigError(f"{len(failed)} of {len(batch)} scores of this batch are errors (more than "
                                  f"reward.max_error_fraction={self.max_error_fraction:g}); the first: "
                                  f"{failed[0]['error'].splitlines()[0]} (all in {self.path or ERRORS_FILE})",
                                  field=f"reward.functions.{function}")


def _kind(error: str) -> str:
    """The exception type (or the first words of the message) of an error record."""
    first = error.splitlines()[0] if error else ""
    return first.split(":", 1)[0] if ":" in first else first[:40]


def _last_message(prompt: Any) -> Any:
    return prompt[-1].get("content") if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) \
        else prompt
