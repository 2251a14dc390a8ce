"""The run's progress display: the training bar (step, key metrics, throughput, ETA) and a bar for every
phase around it that takes time: data preparation, the reference pass, evaluation, sampling rounds.

All of them are tasks of one `rich.progress.Progress`, because rich allows one live display at a time and
the phases of a sampling round or an evaluation run inside the training bar's loop. A phase started while
another bar is on screen is a second line under it, removed when the phase ends; a phase with nothing
else on screen (the reference pass before training) leaves its final line ("reference logprobs 8000/8000
0:02:03"), and on a console that is not a terminal (a log file) only those final lines are printed, as rich
does for the training bar.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import datasets
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from posttrain.train.dist import is_main_process

PLAIN_LINE_EVERY_S = 60.0  # on a console that is not a terminal: a phase's line at least this often


class Phase:
    """One phase's bar: `advance(n)` as its work gets done (rows, problems, prompts). On a console that is not a
    terminal (a log file), where rich draws no live bar, a plain line every PLAIN_LINE_EVERY_S seconds instead:
    a reference pass or an evaluation of an hour is not an hour of silence."""

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self._progress, self._task = progress, task
        self._plain = progress is not None and not progress.console.is_terminal
        self._start = self._said = time.monotonic()

    def advance(self, amount: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, amount)
            self._say()

    def update(self, completed: float | None = None, total: float | None = None,
               metrics: dict[str, Any] | None = None) -> None:
        if self._progress is None:
            return
        fields = {"metrics": format_metrics(metrics)} if metrics else {}
        self._progress.update(self._task, completed=completed, total=total, **fields)

    def _say(self) -> None:
        now = time.monotonic()
        if not self._plain or now - self._said < PLAIN_LINE_EVERY_S:
            return
        self._said = now
        task = next(t for t in self._progress.tasks if t.id == self._task)
        total = f"/{task.total:g}" if task.total is not None else ""
        self._progress.console.print(f"{task.description} {task.completed:g}{total}  elapsed "
                                     f"{_clock(now - self._start)}", soft_wrap=True, highlight=False, markup=False)


SILENT = Phase(None, None)


class RunProgress:
    """The bars of one run (silent when disabled: `run.progress=false`, or a rank other than 0)."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, disable=not enabled, transient=False)
        self._open: list[TaskID] = []

    @classmethod
    def for_run(cls, run: Any, console: Console | None = None) -> RunProgress:
        """The display of a run's `run:` section; a recipe makes it before torchrun's process group exists, so
        the rank comes from the environment too."""
        main = is_main_process() and os.environ.get("RANK", "0") == "0"
        return cls(enabled=bool(run.progress) and main, console=console)

    @property
    def console(self) -> Console:
        return self.progress.console

    @contextlib.contextmanager
    def phase(self, description: str, total: float | None) -> Iterator[Phase]:
        """A bar for the duration of the block (total None: no known end, a bar that pulses)."""
        if not self.enabled:
            yield SILENT
            return
        task = self.progress.add_task(description, total=total, metrics="")
        if not self._open:
            self.progress.start()
        self._open.append(task)
        try:
            yield Phase(self.progress, task)
        finally:
            self._open.remove(task)
            if not self._open:
                self.progress.stop()  # renders its final state once: the phase's last line stays
            self.progress.remove_task(task)

    @contextlib.contextmanager
    def library_bars(self) -> Iterator[None]:
        """`datasets`' own bars (reading a file, `map` while tokenising) for the block, when this display shows
        anything on a terminal: they count rows where a bar of ours could not see inside. Off otherwise (the CLI
        turns them off so that logs stay clean; a library user's run.progress=false too), and put back as they
        were."""
        if self._open:
            yield
            return
        shown = self.enabled and self.console.is_terminal
        was_enabled = datasets.is_progress_bar_enabled()
        (datasets.enable_progress_bars if shown else datasets.disable_progress_bars)()
        try:
            yield
        finally:
            (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()


class TrainProgress:
    """The training bar: a phase of `display` (or of a display of its own) for one training run. On a console
    that is not a terminal (a log file: nohup, a batch job), where rich draws no live bar, a plain line every
    `log_every` steps instead (step, metrics, elapsed time and ETA), so that a run of hours is not silent."""

    def __init__(self, description: str, total: int, enabled: bool = True, console: Console | None = None,
                 display: RunProgress | None = None, log_every: int = 0) -> None:
        self.display = display if display is not None else RunProgress(enabled, console)
        self._description, self._total, self._log_every = description, total, log_every
        self._phase: contextlib.AbstractContextManager[Phase] | None = None
        self._bar = SILENT
        self._start: tuple[float, int] | None = None  # when and at which step this session's first update was
        self._said = time.monotonic()  # when the last plain line was printed

    def update(self, completed: int, metrics: dict[str, Any] | None = None) -> None:
        self._bar.update(completed=completed, metrics=metrics)
        if self._start is None:
            self._start = (time.monotonic(), completed)
            return
        plain = self.display.enabled and not self.display.console.is_terminal
        now = time.monotonic()
        if plain and self._log_every and (completed % self._log_every == 0
                                          or now - self._said >= PLAIN_LINE_EVERY_S):  # slow steps: by time too
            self._said = now
            elapsed, done = now - self._start[0], completed - self._start[1]
            eta = elapsed / done * (self._total - completed) if done > 0 else math.nan
            self.display.console.print(
                f"{self._description} step {completed}/{self._total}  {format_metrics(metrics or {})}  "
                f"elapsed {_clock(elapsed)}  eta {_clock(eta)}", soft_wrap=True, highlight=False, markup=False)

    def __enter__(self) -> TrainProgress:
        self._phase = self.display.phase(self._description, self._total)
        self._bar = self._phase.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._phase.__exit__(*exc)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-:--:--"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


SHORT_NAMES = {"tokens_per_s": "tok/s", "eval_loss": "eval"}


def format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        key = SHORT_NAMES.get(key, key)
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}" if abs(value) < 1e4 else f"{key} {value:,.0f}")
        else:
            parts.append(f"{key} {value}")
    return "  ".join(parts)
