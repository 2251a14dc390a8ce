"""A finished run's report: `report.md` with its summary table and PNG training curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import RunDirError
from posttrain.eval.headroom import headroom_lines, headroom_rows
from posttrain.eval.heldout import headroom_summaries
from posttrain.eval.plotting import new_figure, save_png
from posttrain.train.dist import is_main_process
from posttrain.train.metrics import finite_json, read_metrics, replace_text
from posttrain.train.run_dir import RunDir

# The panels of a report's curves, each a training metric and its held-out (eval_) counterpart, of those the run
# logged: losses, rewards, accuracies (a task's; a reward model's and DPO's pairwise), margins (the preference
# stages' chosen-minus-rejected), KL, learning rate.
CURVE_KEYS = ("loss", "reward", "accuracy", "reward_accuracy", "margin", "reward_margin", "kl", "lr")
COLUMNS = 4
PANEL_INCHES = (4.2, 3.4)  # the figure's share per panel, margins included, at matplotlib's default 10-point text
# Around the panels (left: the tick labels and the y label; top: the suptitle and a panel's title) and between them
# (across: the next panel's tick labels and y label; down: an x label and the next row's title), in inches at
# 10-point text: "-0.00025" and a y label fit on the left of any panel, half of a last step "150000" on the right.
PANEL_MARGINS = (0.95, 0.35, 0.75, 0.55, 0.95, 0.9)


def curve_panels(metrics: list[dict[str, Any]]) -> list[list[tuple[str, list[tuple[int, float]]]]]:
    """The panels `plot_curves` draws: for each key of `CURVE_KEYS` the run logged (or its eval_ value), the
    (step, value) points of the key and of eval_<key>, those it has."""
    def points(key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in metrics if r.get(key) is not None and "step" in r]

    panels = [[(k, points(k)) for k in (key, f"eval_{key}") if points(k)] for key in CURVE_KEYS]
    return [panel for panel in panels if panel]


def plot_curves(metrics: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    """One panel per metric of `CURVE_KEYS` that the run logged, with its held-out value beside it (eval_<key>),
    against the optimizer step, `COLUMNS` panels to a row."""
    panels = curve_panels(metrics)
    if not panels:
        return None
    columns, rows = min(COLUMNS, len(panels)), math.ceil(len(panels) / COLUMNS)
    fig = _figure_of_panels(rows, columns)
    for index, panel in enumerate(panels):
        ax = fig.add_subplot(rows, columns, index + 1)
        for key, series in panel:
            steps, values = zip(*series, strict=True)
            ax.plot(steps, values, marker="o" if len(series) < 20 else None, markersize=3,
                    label="held out" if key.startswith("eval_") else "training")
        name = panel[0][0].removeprefix("eval_").replace("_", " ")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if len(panel) > 1 or panel[0][0].startswith("eval_"):
            ax.legend(fontsize=8)
    fig.suptitle(title, parse_math=False)  # a data path's "$x$" is no math for matplotlib to typeset (or fail on)
    return save_png(fig, out, fit=False)


def _figure_of_panels(rows: int, columns: int) -> Any:
    """A figure of `rows` x `columns` panels placed by margins of fixed widths around and between them
    (`PANEL_MARGINS`), all scaled with the configured font size. Every panel has the same labels, and matplotlib keeps
    a tick label to a few characters (an offset or an exponent above the axis beyond that), so measuring them
    (`tight_layout`, which draws the whole figure once more) was ~40% of the time of every run's report."""
    from matplotlib import rcParams

    scale = rcParams["font.size"] / 10
    width, height = PANEL_INCHES[0] * scale * columns, PANEL_INCHES[1] * scale * rows
    fig = new_figure(width, height)
    left, right, top, bottom, across, down = (inches * scale for inches in PANEL_MARGINS)
    panel_width = (width - left - right - across * (columns - 1)) / columns
    panel_height = (height - top - bottom - down * (rows - 1)) / rows
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height,
                        wspace=across / panel_width, hspace=down / panel_height)
    return fig


def write_training_report(run_dir: RunDir, title: str, summary: dict[str, Any]) -> Path:
    """Write `<run>/report.md` and `<run>/plots/curves.png` from the run's metrics.jsonl, and summary.json (rank 0
    only)."""
    report = run_dir.path / "report.md"
    if not is_main_process():
        return report
    _write_report(run_dir, title, summary)
    # The title and summary are kept so that `posttrain report <run>` can redraw all of it later; written whole or
    # not at all, and last, since a summary.json is what marks a run finished: a report that could not be written (a
    # full disk) leaves the run unfinished, and `posttrain resume` writes it from the last step's checkpoint.
    replace_text(run_dir.path / "summary.json", finite_json({"title": title, "summary": summary}, indent=2,
                                                           default=str))
    return report


def _write_report(run_dir: RunDir, title: str, summary: dict[str, Any]) -> Path:
    """report.md (a table of `summary`, the headroom table, the curves) and plots/curves.png."""
    report = run_dir.path / "report.md"
    metrics = read_metrics(run_dir.metrics) if run_dir.metrics.is_file() else []  # a run stopped before its first step
    plot = plot_curves(metrics, run_dir.plots / "curves.png", title)
    lines = [f"# {title}", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {key.replace('_', ' ')} | {_fmt(value)} |" for key, value in summary.items()
              if not key.startswith("heldout_headroom")]
    lines += headroom_lines(headroom_rows(headroom_summaries(summary), {"after": "before"}), first="model")
    if plot is not None:
        lines += ["", f"![training curves](plots/{plot.name})"]
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def write_unfinished_report(run_dir: RunDir) -> Path:
    """report.md and curves of a run that has not finished (stopped by non-finite losses, interrupted, killed, still
    running) from what its metrics.jsonl holds: its last logged step's values, under a title that says so. No
    summary.json, which marks a run finished (a resume writes the finished report)."""
    metrics = read_metrics(run_dir.metrics) if run_dir.metrics.is_file() else []
    stepped = [record for record in metrics if "step" in record]
    if not stepped:
        raise RunDirError("is neither a finished run (no summary.json) nor one that logged a step (no step in "
                          "metrics.jsonl): no report to draw", file=str(run_dir.path))
    config = run_dir.path / "config.yaml"
    stage = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("stage", "run") if config.is_file() \
        else "run"
    last = stepped[-1]
    title = f"{stage} {run_dir.path.name}: unfinished, last logged step {last['step']}"
    summary = {"status": f"unfinished (resume with: posttrain resume {run_dir.path})",
               **{key: value for key, value in last.items() if isinstance(value, (int, float, str))}}
    return _write_report(run_dir, title, summary)


def _fmt(value: Any) -> str:
    # summary.json keeps a NaN or infinite number as null (JSON has none): a report redrawn from it says the same as
    # the one the run wrote ("nan" there and "None" redrawn, before).
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):  # the data's statistics: "rows 1,000, kept 998, ...", not a Python dict's repr
        return ", ".join(f"{key.replace('_', ' ')} {_fmt(item)}" for key, item in value.items())
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
