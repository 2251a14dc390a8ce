"""The demo's report: `<demo>/report.md` with the stage table and PNG plots across stages.

    plots/accuracy.png      held-out exact match per stage with its 95% interval, one panel per task
    plots/headroom.png      per category of problem: sampled and greedy accuracy and pass@k of every stage
    plots/curves.png        each stage's training curves (loss; reward where the stage has one)
    plots/reward_vs_kl.png  RL and preference stages: mean sampled reward against KL to the model they started from

Everything is read back from the run directories (demo.json, each stage's metrics.jsonl and eval.json),
so `posttrain report runs/demo` rebuilds it without rerunning anything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from posttrain.errors import RunDirError
from posttrain.eval.accuracy import paired_interval, wilson_interval
from posttrain.eval.headroom import headroom_lines, headroom_rows
from posttrain.eval.plotting import new_figure, save_png
from posttrain.train.metrics import read_metrics

Summaries = dict[str, dict[str, Any]]


def stage_rows(summaries: Summaries, bases: dict[str, str | None]) -> list[dict[str, Any]]:
    """One row per stage: time, tokens read, accuracy with its interval, and the change over the model
    the stage started from when that is a supervised model (SFT), so every RL stage is compared with its
    own starting point."""
    rows = []
    for name, summary in summaries.items():
        accuracy = summary.get("accuracy")
        base = bases.get(name)
        base_accuracy = summaries.get(base, {}).get("accuracy") if base else None
        delta = accuracy - base_accuracy if accuracy is not None and base_accuracy is not None else None
        rows.append({"stage": name, "base": base, "seconds": summary.get("seconds"),
                     "tokens": summary.get("trained_tokens", summary.get("tokens")),
                     "accuracy": accuracy, "ci": summary.get("accuracy_ci"),
                     "delta": delta, "step_accuracy": summary.get("step_accuracy"),
                     "kl": summary.get("kl_to_base"), "sampled_reward": summary.get("sampled_reward"),
                     "other": _other_result(summary)})
    return rows


def _other_result(summary: dict[str, Any]) -> str:
    if "eval_accuracy" in summary and "accuracy" not in summary:  # reward models
        return reward_model_result(summary)
    if "final_eval_loss" in summary:
        return f"held-out loss {summary['final_eval_loss']:.3f}"
    return ""


def reward_model_result(summary: dict[str, Any]) -> str:
    """Held-out pairwise accuracy (a Wilson interval over its pairs, each right or wrong) and, for pairs of the
    model's own samples, the accuracy on the data's own held-out comparisons beside it."""
    accuracy, rows = summary["eval_accuracy"], summary.get("eval_rows") or 0
    text = f"pairwise {accuracy:.1%}"
    if rows:
        low, high = wilson_interval(round(accuracy * rows), rows)
        text += f" ({low:.1%}–{high:.1%}) on {rows} {'sampled ' if summary.get('pairs') == 'on_policy' else ''}pairs"
    if "eval_offline_accuracy" in summary:
        text += f"; the task's own pairs {summary['eval_offline_accuracy']:.1%}"
    return text


def plot_accuracy(rows: list[dict[str, Any]], tasks: dict[str, str], out: Path) -> Path | None:
    """Bar chart of held-out exact match per stage with 95% error bars, one panel per task."""
    scored = [r for r in rows if r["accuracy"] is not None]
    if not scored:
        return None
    panels = sorted({tasks.get(r["stage"], "arith") for r in scored})
    widths = [len([r for r in scored if tasks.get(r["stage"], "arith") == p]) for p in panels]
    fig = new_figure(1.3 * sum(widths) + 2.5, 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False, gridspec_kw={"width_ratios": widths})
    for ax, panel in zip(axes[0], panels, strict=True):
        mine = [r for r in scored if tasks.get(r["stage"], "arith") == panel]
        values = [100 * r["accuracy"] for r in mine]
        low = [100 * (r["accuracy"] - r["ci"][0]) if r["ci"] else 0 for r in mine]
        high = [100 * (r["ci"][1] - r["accuracy"]) if r["ci"] else 0 for r in mine]
        bars = ax.bar(range(len(mine)), values, yerr=[low, high], capsize=4, color="tab:blue", alpha=0.8)
        for bar, value, top in zip(bars, values, high, strict=True):  # the value above its error bar
            ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value + top), xytext=(0, 3),
                        textcoords="offset points", ha="center", fontsize=8)
        ax.set_xticks(range(len(mine)), [r["stage"] for r in mine], rotation=30, ha="right")
        ax.set_ylabel("held-out exact match (%)")
        ax.set_title(f"task: {panel}")
        ax.set_ylim(0, min(100, max(v + h for v, h in zip(values, high, strict=True)) * 1.15 + 5))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Held-out accuracy by stage (greedy, 95% Wilson interval)")
    return save_png(fig, out)


def plot_stage_curves(demo_dir: Path, stages: list[str], out: Path) -> Path | None:
    """One panel per stage: its training loss against the step, and its mean reward on a second axis."""
    curves = {name: read_metrics(demo_dir / name / "metrics.jsonl") for name in stages
              if (demo_dir / name / "metrics.jsonl").is_file()}
    curves = {name: rows for name, rows in curves.items() if rows}
    if not curves:
        return None
    columns = min(3, len(curves))
    lines = math.ceil(len(curves) / columns)
    fig = new_figure(5.2 * columns, 3.4 * lines)
    axes = fig.subplots(lines, columns, squeeze=False)
    for ax, (name, rows) in zip(axes.flat, curves.items(), strict=False):
        _plot_series(ax, rows, "loss", "tab:blue")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss", color="tab:blue")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if any(r.get("reward") is not None for r in rows):
            twin = ax.twinx()
            _plot_series(twin, rows, "reward", "tab:orange")
            twin.set_ylabel("mean reward", color="tab:orange")
    for ax in list(axes.flat)[len(curves):]:
        ax.set_visible(False)
    fig.suptitle("Training curves per stage")
    return save_png(fig, out)


def _plot_series(ax: Any, rows: list[dict[str, Any]], key: str, color: str) -> None:
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
    if points:
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, color=color, marker="o" if len(points) < 20 else None, markersize=3)


def plot_reward_vs_kl(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Mean reward of samples at temperature 1 against KL(stage || its starting model), per RL / preference
    stage, with the starting models at KL 0: how much reward each stage bought with how much drift."""
    measured = [r for r in rows if r["kl"] is not None and r["sampled_reward"] is not None]
    if not measured:
        return None
    by_stage = {r["stage"]: r for r in rows}
    fig = new_figure(6.8, 4.6)
    ax = fig.subplots()
    for r in measured:
        start = by_stage.get(r["base"] or "", {}).get("sampled_reward")
        points = ([(0.0, start)] if start is not None else []) + [(r["kl"], r["sampled_reward"])]
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", markersize=5, label=f"{r['stage']} (from {r['base']})")
    ax.set_xlabel("KL to the starting model (nats per completion)")
    ax.set_ylabel("mean reward at temperature 1 (exact match)")
    ax.set_title("Reward gained against distance travelled")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_png(fig, out)


def plot_headroom(rows: list[dict[str, Any]], tasks: dict[str, str], out: Path) -> Path | None:
    """One panel per task: per category, each stage's sampled accuracy (bar), greedy accuracy (dash) and pass@k
    (dot): the gap from the bar to the dot is what RL can still capture."""
    if not rows:
        return None
    panels = sorted({tasks.get(r["stage"], "arith") for r in rows})
    fig = new_figure(7.0 * len(panels), 4.4)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        mine = [r for r in rows if tasks.get(r["stage"], "arith") == panel]
        stages = list(dict.fromkeys(r["stage"] for r in mine))
        categories = list(dict.fromkeys(r["category"] for r in mine))
        width = 0.8 / len(stages)
        for j, stage in enumerate(stages):
            by_category = {r["category"]: r for r in mine if r["stage"] == stage}
            xs = [i + (j - (len(stages) - 1) / 2) * width for i, c in enumerate(categories) if c in by_category]
            entries = [by_category[c] for c in categories if c in by_category]
            color = f"C{j % 10}"
            ax.bar(xs, [100 * e["sampled_accuracy"] for e in entries], width, color=color, alpha=0.75, label=stage)
            ax.scatter(xs, [100 * (e.get(e["ceiling"]) or 0) for e in entries], color=color, marker="o", s=14,
                       edgecolor="black", linewidth=0.5, zorder=3)
            greedy = [(x, 100 * e["accuracy"]) for x, e in zip(xs, entries, strict=True) if "accuracy" in e]
            if greedy:
                ax.scatter(*zip(*greedy, strict=True), color="black", marker="_", s=60, zorder=3)
        ax.set_xticks(range(len(categories)), categories)
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(f"task: {panel} (bar: sampled at T=1, dash: greedy, dot: pass@k)", fontsize=9)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Headroom per category and stage")
    return save_png(fig, out)


def paired_gain(before: dict[str, Any], after: dict[str, Any], key: str,
                category: str | None = None) -> tuple[float, float, float] | None:
    """`after`'s change over `before` in greedy ("greedy") or sampled ("correct_samples", as a share of each
    problem's samples) accuracy or in the share of each problem's steps right ("steps_right", greedy), with its
    paired 95% interval, on the problems both were measured on (the first N
    of the same held-out draw), or None where one of them lacks the numbers. With `category`, on those of
    its problems only (`before`'s `per_problem["category"]`; None where fewer than two)."""
    first, second = (summary.get("per_problem", {}).get(key) for summary in (before, after))
    if not first or not second:
        return None
    picked = range(min(len(first), len(second)))
    if category is not None:
        categories = before.get("per_problem", {}).get("category") or []
        picked = [i for i in picked if i < len(categories) and categories[i] == category]
        if len(picked) < 2:
            return None
    scale = [1.0 / s.get("samples_per_problem", 1) if key == "correct_samples" else 1.0 for s in (before, after)]
    return paired_interval([first[i] * scale[0] for i in picked], [second[i] * scale[1] for i in picked])


def paired_gains_by_category(before: dict[str, Any], after: dict[str, Any],
                             key: str) -> dict[str, tuple[float, float, float]]:
    """`paired_gain` within each category of the problems (`per_problem["category"]`, the task's kinds of problem:
    chain lengths, operators), in the categories' sorted order; empty where the problems have fewer than two
    categories. Where an overall difference lives: in every kind of problem, or in one."""
    categories = set(before.get("per_problem", {}).get("category") or []) - {None}
    if len(categories) < 2:
        return {}
    gains = {category: paired_gain(before, after, key, category) for category in sorted(categories)}
    return {category: gain for category, gain in gains.items() if gain is not None}


def gain_rows(summaries: Summaries, bases: dict[str, str | None]) -> list[dict[str, Any]]:
    """Per stage that post-trains a policy: its greedy and sampled gains over its start, paired intervals."""
    rows = []
    for name, summary in summaries.items():
        base = summaries.get(bases.get(name) or "")
        if not base or "per_problem" not in base:
            continue
        rows.append({"stage": name, "base": bases[name], "greedy": paired_gain(base, summary, "greedy"),
                     "sampled": paired_gain(base, summary, "correct_samples")})
    return rows


def _gain_lines(rows: list[dict[str, Any]], summaries: Summaries) -> list[str]:
    if not rows:
        return []
    lines = ["", "## Gains over the starting model", "",
             "Change in held-out greedy and sampled (T=1) accuracy over the model each stage started from, on the "
             "same problems, with its paired 95% interval (mean of the per-problem differences ± 1.96 standard "
             "errors); a gain counts when its interval excludes 0.", "",
             "| stage | from | Δ greedy (95% CI) | Δ sampled (95% CI) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['base']} | {_interval(r['greedy'])} | {_interval(r['sampled'])} |")
    compared = [(first, second) for first, second in COMPARISONS if first in summaries and second in summaries]
    if compared:
        lines += ["", "GRPO against its controls, and process against outcome supervision, on the same problems "
                      "(the first minus the second):", ""]
        for first, second in compared:
            gains = {key: paired_gain(summaries[second], summaries[first], key) for key in ("greedy",
                                                                                             "correct_samples",
                                                                                             "steps_right")}
            steps = f", steps right {_interval(gains['steps_right'])}" if gains["steps_right"] else ""
            lines.append(f"- {first} − {second}: greedy {_interval(gains['greedy'])}, sampled "
                         f"{_interval(gains['correct_samples'])}{steps}")
            key = "steps_right" if gains["steps_right"] else "greedy"
            by_category = paired_gains_by_category(summaries[second], summaries[first], key)
            if by_category:
                lines.append(f"  - {'steps right' if key == 'steps_right' else 'greedy'} by category: "
                             + ", ".join(f"{category} {_interval(gain)}" for category, gain in by_category.items()))
    return lines


# Pairs of demo stages trained from the same start with the same budget, that differ in one thing.
COMPARISONS = (("grpo", "grpo-coin"), ("grpo", "sft-more"), ("grpo-process", "grpo-outcome"))


def _interval(gain: tuple[float, float, float] | None) -> str:
    if gain is None:
        return ""
    mean, low, high = gain
    return f"{mean:+.1%} ({low:+.1%} to {high:+.1%})"


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """The time during which at least one of the (start, end) spans ran: the wall time of stages that overlapped,
    without the gaps between demos run at different times."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def write_demo_report(demo_dir: str | Path, bases: dict[str, str | None], tasks: dict[str, str]) -> Path:
    """Write `<demo_dir>/report.md` and its plots from demo.json and the stages' run directories.

    bases: the stage each stage started from; tasks: the task each stage is evaluated on.
    """
    demo_dir = Path(demo_dir)
    try:
        summaries: Summaries = json.loads((demo_dir / "demo.json").read_text(encoding="utf-8"))
    except ValueError as err:
        raise RunDirError(f"is damaged ({err}): the demo's report cannot be redrawn from it",
                          file=str(demo_dir / "demo.json")) from None
    rows = stage_rows(summaries, bases)
    headroom = headroom_rows(summaries, bases)
    plots = [plot_accuracy(rows, tasks, demo_dir / "plots" / "accuracy.png"),
             plot_headroom(headroom, tasks, demo_dir / "plots" / "headroom.png"),
             plot_reward_vs_kl(rows, demo_dir / "plots" / "reward_vs_kl.png"),
             plot_stage_curves(demo_dir, list(summaries), demo_dir / "plots" / "curves.png")]
    lines = ["# posttrain demo", "",
             "Every stage from the same pretrained tiny model; each RL and preference stage starts from the SFT "
             "model of its task, and Δ is measured against the model the stage started from. Accuracy: greedy "
             "exact match on held-out problems no training set contains, with its 95% Wilson interval.", "",
             "| stage | from | time | tokens | held-out accuracy (95% CI) | Δ vs start | steps right "
             "| KL to start | other |",
             "|---|---|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        accuracy = (f"{r['accuracy']:.1%} ({r['ci'][0]:.1%}–{r['ci'][1]:.1%})" if r["accuracy"] is not None
                    and r["ci"] else "")
        lines.append(f"| {r['stage']} | {r['base'] or ''} | {_num(r['seconds'], '{:.0f} s')} | "
                     f"{_num(r['tokens'], '{:,}')} | {accuracy} | {_num(r['delta'], '{:+.1%}')} | "
                     f"{_num(r['step_accuracy'], '{:.1%}')} | {_num(r['kl'], '{:.3f}')} | {r['other']} |")
    total = sum(r["seconds"] or 0 for r in rows)
    # stages without clock times (a demo.json from before they were recorded) count as if they ran alone
    busy = (busy_seconds([(s["started_at"], s["finished_at"]) for s in summaries.values() if "finished_at" in s])
            + sum(s.get("seconds") or 0 for s in summaries.values() if "finished_at" not in s))
    if busy < total - 1.0:  # stages ran side by side
        lines += ["", f"Total time: {busy / 60:.1f} min with stages side by side (their own times add up to "
                      f"{total / 60:.1f} min).", ""]
    else:
        lines += ["", f"Total time: {total / 60:.1f} min.", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots if p is not None]
    lines += _gain_lines(gain_rows(summaries, bases), summaries)
    lines += headroom_lines(headroom)
    lines += ["", "Each stage's own report (curves, samples, config) is in its run directory: "
              + ", ".join(f"[{name}]({name}/report.md)" for name in summaries) + "."]
    report = demo_dir / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def _num(value: Any, fmt: str) -> str:
    return "" if value is None else fmt.format(value)
