"""A finished run's report: `report.md` with its summary table and PNG training curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from posttrain.errors import RunDirError
from posttrain.eval.headroom import headroom_lines, headroom_rows
from posttrain.eval.heldout import headroom_summaries
from posttrain.eval.plotting import pyplot
from posttrain.train.dist import is_main_process
from posttrain.train.metrics import finite_json, read_metrics, replace_text
from posttrain.train.run_dir import RunDir

CURVE_KEYS = ("loss", "eval_loss", "reward", "kl", "lr")


def plot_curves(metrics: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    """One panel per metric that the run logged, against the optimizer step."""
    plt = pyplot()
    keys = [k for k in CURVE_KEYS if any(r.get(k) is not None and "step" in r for r in metrics)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(r["step"], r[key]) for r in metrics if r.get(key) is not None and "step" in r]
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_title(key.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.suptitle(title.replace("$", r"\$"))  # a data path's "$x$" is no math for matplotlib to typeset (or fail on)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_training_report(run_dir: RunDir, title: str, summary: dict[str, Any]) -> Path:
    """Write `<run>/report.md` and `<run>/plots/curves.png` from the run's metrics.jsonl (rank 0 only)."""
    report = run_dir.path / "report.md"
    if not is_main_process():
        return report
    metrics = read_metrics(run_dir.metrics) if run_dir.metrics.is_file() else []  # a run stopped before its first step
    plot = plot_curves(metrics, run_dir.plots / "curves.png", title)
    lines = [f"# {title}", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {key.replace('_', ' ')} | {_fmt(value)} |" for key, value in summary.items()
              if not key.startswith("heldout_headroom")]
    lines += headroom_lines(headroom_rows(headroom_summaries(summary), {"after": "before"}), first="model")
    if plot is not None:
        lines += ["", f"![training curves](plots/{plot.name})"]
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # The title and summary are kept so that `posttrain report <run>` can redraw all of it later; written whole or
    # not at all, and last, since a summary.json is what marks a run finished: a report that could not be written (a
    # full disk) leaves the run unfinished, and `posttrain resume` writes it from the last step's checkpoint.
    replace_text(run_dir.path / "summary.json", finite_json({"title": title, "summary": summary}, indent=2,
                                                           default=str))
    return report


def _fmt(value: Any) -> str:
    # summary.json keeps a NaN or infinite number as null (JSON has none): a report redrawn from it says the same as
    # the one the run wrote ("nan" there and "None" redrawn, before).
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def rebuild_training_report(run_dir: RunDir) -> Path:
    """Redraw a finished run's report from its summary.json and metrics.jsonl (`posttrain report <run>`)."""
    path = run_dir.path / "summary.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        title, summary = saved["title"], saved["summary"]
    except (ValueError, KeyError, TypeError) as err:
        raise RunDirError(f"is damaged ({type(err).__name__}: {err}): the run's report cannot be redrawn from it",
                          file=str(path)) from None
    return write_training_report(run_dir, title, summary)
