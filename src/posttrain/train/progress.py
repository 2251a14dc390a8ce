"""A rich progress bar showing step, the key metrics and throughput, with ETA."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """Context manager around `rich.progress.Progress` for one training run (silent when disabled)."""

    def __init__(self, description: str, total: int, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, disable=not enabled, transient=False)
        self._task = self._progress.add_task(description, total=total, metrics="")

    def update(self, completed: int, metrics: dict[str, Any] | None = None) -> None:
        fields = {"metrics": format_metrics(metrics)} if metrics else {}
        self._progress.update(self._task, completed=completed, **fields)

    def __enter__(self) -> TrainProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()


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
