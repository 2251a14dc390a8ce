"""The demo report's comparisons: paired gains over each stage's start and against GRPO's controls, and the
headroom table with the share captured, from hand-made stage summaries."""

from __future__ import annotations

import json

import pytest

from posttrain.eval.accuracy import paired_interval
from posttrain.eval.demo_report import gain_rows, headroom_rows, paired_gain, reward_model_result, write_demo_report


def summary(greedy, samples, accuracy=None, headroom=None):
    out = {"per_problem": {"greedy": greedy, "correct_samples": samples}, "samples_per_problem": 4}
    return out | ({"accuracy": accuracy} if accuracy is not None else {}) | ({"headroom": headroom} if headroom else {})


SFT = summary([1, 0, 0, 1, 0, 1], [2, 0, 1, 4, 1, 2], 0.5,
              {"all": {"problems": 6, "accuracy": 0.5, "sampled_accuracy": 10 / 24, "pass@4": 5 / 6,
                       "intermediate_share": 4 / 6}})
GRPO = summary([1, 1, 0, 1, 1, 1], [4, 2, 1, 4, 3, 4], 5 / 6,
               {"all": {"problems": 6, "accuracy": 5 / 6, "sampled_accuracy": 18 / 24, "pass@4": 5 / 6,
                        "intermediate_share": 2 / 6}})
COIN = summary([1, 0, 0, 1, 0, 0], [2, 0, 0, 4, 1, 1], 1 / 3)


def test_paired_gains_use_the_same_problems_and_samples_as_shares():
    greedy = paired_gain(SFT, GRPO, "greedy")
    assert greedy == paired_interval([1, 0, 0, 1, 0, 1], [1, 1, 0, 1, 1, 1])
    sampled = paired_gain(SFT, GRPO, "correct_samples")
    assert sampled == pytest.approx(paired_interval([0.5, 0, 0.25, 1, 0.25, 0.5], [1, 0.5, 0.25, 1, 0.75, 1]))
    # A stage measured on fewer problems is compared on the first ones (the same held-out draw).
    short = summary([1, 1, 0], [4, 2, 1])
    assert paired_gain(SFT, short, "greedy") == paired_interval([1, 0, 0], [1, 1, 0])
    assert paired_gain({}, GRPO, "greedy") is None


def test_report_has_gains_controls_and_headroom_captured(tmp_path):
    summaries = {"sft": SFT, "grpo": GRPO, "grpo-coin": COIN}
    bases = {"sft": None, "grpo": "sft", "grpo-coin": "sft"}
    assert [r["stage"] for r in gain_rows(summaries, bases)] == ["grpo", "grpo-coin"]
    captured = {r["stage"]: r for r in headroom_rows(summaries, bases)}["grpo"]
    assert captured["captured_sampled"] == pytest.approx((18 / 24 - 10 / 24) / (5 / 6 - 10 / 24))
    assert captured["captured_greedy"] == pytest.approx((5 / 6 - 0.5) / (5 / 6 - 0.5))
    (tmp_path / "demo.json").write_text(json.dumps(summaries))
    report = write_demo_report(tmp_path, bases, {"sft": "chain", "grpo": "chain", "grpo-coin": "chain"}).read_text()
    mean, low, high = paired_gain(SFT, GRPO, "greedy")
    assert f"| grpo | sft | {mean:+.1%} ({low:+.1%} to {high:+.1%}) |" in report
    assert "- grpo − grpo-coin: greedy" in report and "## Headroom per category" in report
    assert (tmp_path / "plots" / "headroom.png").is_file()


def test_process_against_outcome_is_paired_on_each_problems_share_of_steps_right(tmp_path):
    process = summary([1, 0, 1], [3, 1, 2]) | {"per_problem": {"greedy": [1, 0, 1], "correct_samples": [3, 1, 2],
                                                               "steps_right": [1.0, 0.5, 1.0]}}
    outcome = summary([1, 0, 0], [2, 1, 2]) | {"per_problem": {"greedy": [1, 0, 0], "correct_samples": [2, 1, 2],
                                                               "steps_right": [1.0, 0.0, 0.5]}}
    assert paired_gain(outcome, process, "steps_right") == paired_interval([1.0, 0.0, 0.5], [1.0, 0.5, 1.0])
    start = summary([1, 0, 0], [2, 1, 1])
    (tmp_path / "demo.json").write_text(json.dumps({"sft-multistep": start, "grpo-process": process,
                                                    "grpo-outcome": outcome}))
    stages = ("sft-multistep", "grpo-process", "grpo-outcome")
    report = write_demo_report(tmp_path, {"sft-multistep": None, "grpo-process": "sft-multistep",
                                          "grpo-outcome": "sft-multistep"}, dict.fromkeys(stages, "multistep"))
    report = report.read_text()
    mean, low, high = paired_interval([1.0, 0.0, 0.5], [1.0, 0.5, 1.0])
    assert "- grpo-process − grpo-outcome: greedy" in report
    assert f"steps right {mean:+.1%} ({low:+.1%} to {high:+.1%})" in report


def test_comparisons_are_broken_down_by_the_problems_categories(tmp_path):
    categories = ["2 steps", "5 steps", "2 steps", "5 steps"]
    process = {"per_problem": {"greedy": [1, 0, 1, 0], "correct_samples": [4, 1, 3, 1], "category": categories,
                               "steps_right": [1.0, 0.6, 1.0, 0.6]}, "samples_per_problem": 4}
    outcome = {"per_problem": {"greedy": [1, 0, 0, 0], "correct_samples": [4, 0, 2, 1], "category": categories,
                               "steps_right": [1.0, 0.0, 0.5, 0.2]}, "samples_per_problem": 4}
    start = {"per_problem": {"greedy": [1, 0, 0, 0], "correct_samples": [2, 0, 1, 0], "category": categories},
             "samples_per_problem": 4}
    (tmp_path / "demo.json").write_text(json.dumps({"sft-multistep": start, "grpo-process": process,
                                                    "grpo-outcome": outcome}))
    stages = ("sft-multistep", "grpo-process", "grpo-outcome")
    report = write_demo_report(tmp_path, {"sft-multistep": None, "grpo-process": "sft-multistep",
                                          "grpo-outcome": "sft-multistep"}, dict.fromkeys(stages, "multistep"))
    # 2 steps: differences 0 and 0.5 (mean 0.25); with the pseudo-differences +1 and -1: centre 0.5 / 4 = 0.125,
    # variance (0.25 + 2) / 4 - 0.125^2 = 0.546875, half-width 1.96 sqrt(0.546875 / 4) = 0.725;
    # 5 steps: 0.6 and 0.4 (mean 0.5): centre 0.25, variance (0.36 + 0.16 + 2) / 4 - 0.0625, half-width 0.738
    assert ("  - steps right by category: 2 steps +25.0% (-60.0% to +85.0%), 5 steps +50.0% (-48.8% to +98.8%)"
            in report.read_text())
    # one category (or none recorded): no breakdown
    for summary in (process, outcome, start):
        summary["per_problem"]["category"] = ["2 steps"] * 4
    (tmp_path / "demo.json").write_text(json.dumps({"sft-multistep": start, "grpo-process": process,
                                                    "grpo-outcome": outcome}))
    report = write_demo_report(tmp_path, {"sft-multistep": None, "grpo-process": "sft-multistep",
                                          "grpo-outcome": "sft-multistep"}, dict.fromkeys(stages, "multistep"))
    assert "by category" not in report.read_text()


def test_reward_model_result_gives_the_pairs_wilson_interval_and_the_tasks_own_pairs():
    # 360 of 400 pairs right: Wilson 95% (0.9 + z²/800 ± z·sqrt(0.9·0.1/400 + z²/640000)) / (1 + z²/400), z = 1.96
    summary = {"eval_accuracy": 0.9, "eval_rows": 400, "pairs": "on_policy", "eval_offline_accuracy": 0.71}
    assert reward_model_result(summary) == ("pairwise 90.0% (86.7%–92.6%) on 400 sampled pairs; "
                                            "the task's own pairs 71.0%")
    assert reward_model_result({"eval_accuracy": 0.5, "eval_rows": 0}) == "pairwise 50.0%"


def test_busy_seconds_counts_the_time_any_stage_ran_once():
    from posttrain.eval.demo_report import busy_seconds

    assert busy_seconds([]) == 0.0
    assert busy_seconds([(0.0, 10.0)]) == 10.0
    # two side by side (0-10, 5-12: 12 s), one inside another (6-8), then a gap and one alone (20-23)
    assert busy_seconds([(5.0, 12.0), (20.0, 23.0), (0.0, 10.0), (6.0, 8.0)]) == 15.0
    assert busy_seconds([(0.0, 4.0), (4.0, 6.0)]) == 6.0  # one after the other


def test_training_processes_import_matplotlib_only_to_draw_their_report(tmp_path):
    """~27 MB of every stage's peak RSS and ~0.4 s of its start-up, for plots drawn after the run."""
    import subprocess
    import sys

    modules = ["posttrain.cli", *(f"posttrain.recipes.{r}" for r in ("sft", "rm", "dpo", "grpo", "ppo", "rft",
                                                                        "rejection", "kto", "pretrain"))]
    plot = tmp_path / "c.png"
    check = (f"import sys\nfor m in {modules!r}: __import__(m)\nprint('matplotlib' in sys.modules)\n"
             "from pathlib import Path\nfrom posttrain.eval.report import plot_curves\n"
             f"plot_curves([{{'step': 1, 'loss': 1.0}}, {{'step': 2, 'loss': 0.5}}], Path({str(plot)!r}), 't')\n"
             "print('matplotlib' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"] and plot.stat().st_size > 0


def test_a_training_report_is_written_for_odd_runs(tmp_path):
    """A title with "$" in it (a data path) failed in matplotlib's math parser and left no report; a run without
    metrics.jsonl (stopped before its first step) was a FileNotFoundError from `posttrain report`; a record with a
    curve's key and no step stopped the plot."""
    from PIL import Image

    from posttrain.eval.report import rebuild_training_report, write_training_report
    from posttrain.train.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.metrics.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + json.dumps({"step": 2, "loss": 1.5}) + "\n"
                           + json.dumps({"loss": 9.0, "reward": 1.0}) + "\n")
    report = write_training_report(run, "sft on data/$HOME/rows_$x$.jsonl", {"loss": 1.5})
    assert "| loss | 1.5 |" in report.read_text() and Image.open(run.plots / "curves.png").size[0] > 0
    run.metrics.unlink()
    (run.plots / "curves.png").unlink()
    assert "training curves" not in rebuild_training_report(run).read_text()
    assert not (run.plots / "curves.png").exists()


def test_a_redrawn_report_says_what_the_runs_own_said_of_a_number_json_cannot_hold(tmp_path):
    """summary.json keeps NaN as null: the run's report said "nan" (a KTO step without a desirable row, PPO's
    explained variance) and `posttrain report` redrew it as "None"."""
    from posttrain.eval.report import rebuild_training_report, write_training_report
    from posttrain.train.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.metrics.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    summary = {"reward_margin": float("nan"), "kl": float("inf"), "loss": 2.0}
    written = write_training_report(run, "kto", summary).read_text()
    assert "| reward margin | n/a |" in written and "| kl | n/a |" in written and "| loss | 2 |" in written
    assert rebuild_training_report(run).read_text() == written


def test_curves_plot_the_preference_stages_metrics_beside_their_held_out_values(tmp_path):
    """DPO's reward accuracy and margin, a reward model's accuracy, the held-out values of each were logged and
    never drawn (loss, eval loss, reward, KL and lr only, one panel each)."""
    from PIL import Image

    from posttrain.eval.report import curve_panels, plot_curves

    metrics = [{"step": s, "loss": 0.7 - s / 10, "reward_accuracy": s / 4, "reward_margin": s / 10, "lr": 1e-5,
                **({"eval_loss": 0.6, "eval_reward_accuracy": 0.5, "eval_reward": 1.0} if s % 2 == 0 else {})}
               for s in range(1, 5)] + [{"eval_loss": 0.1}]  # a record without a step: not drawn
    panels = curve_panels(metrics)
    assert [[key for key, _ in panel] for panel in panels] == [
        ["loss", "eval_loss"], ["eval_reward"], ["reward_accuracy", "eval_reward_accuracy"], ["reward_margin"], ["lr"]]
    assert panels[0][1][1] == [(2, 0.6), (4, 0.6)] and panels[3][0][1] == [(s, s / 10) for s in range(1, 5)]
    plot = plot_curves(metrics, tmp_path / "curves.png", "dpo")
    width, height = Image.open(plot).size
    assert width > height * 2  # 4 panels to a row, 2 rows: wider than it is tall, about 4.2 x 4 by 3.4 x 2 inches
    assert height > 3.4 * 110 * 1.5  # two rows


def _drawn_curves(metrics, out, title, monkeypatch):
    """`plot_curves`' figure, drawn on an Agg canvas at the saved resolution as it is saved, for its texts' places in
    pixels. (Drawn before the save: matplotlib's savefig leaves a figure made without a layout engine with the one
    the matplotlibrc names.)"""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from posttrain.eval import plotting, report

    drawn = []

    def draw_and_save(fig, *args, **kwargs):
        fig.set_dpi(plotting.DPI)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        drawn.append((fig, canvas.get_renderer()))
        return plotting.save_png(fig, *args, **kwargs)

    monkeypatch.setattr(report, "save_png", draw_and_save)
    assert report.plot_curves(metrics, out, title) is not None
    (figure_and_renderer,) = drawn
    return figure_and_renderer


def _panel_texts(ax, renderer):
    """The bounding boxes of what a panel writes: title, axis labels, tick labels (those drawn: of ticks inside the
    axis' limits), offset texts, legend."""
    texts = [ax.title, ax.xaxis.label, ax.yaxis.label, ax.xaxis.get_offset_text(), ax.yaxis.get_offset_text()]
    for axis in (ax.xaxis, ax.yaxis):
        low, high = sorted(axis.get_view_interval())
        texts += [label for tick, label in zip(axis.get_ticklocs(), axis.get_ticklabels(), strict=True)
                  if low <= tick <= high]
    boxes = [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]
    if ax.get_legend() is not None:
        boxes.append(ax.get_legend().get_window_extent(renderer))
    return boxes


# The metrics' scales, two ways round: the widest tick labels ("-0.00025", "800000", "-0.0012", an exponent above the
# axis) in the middle columns, and in the first column of both rows (loss, margin), where the left margin holds them.
SCALES = {"middle": {"loss": 150000.0, "reward": -0.00025, "accuracy": 1.0, "reward_accuracy": 1e-9,
                     "margin": -37.5, "reward_margin": 0.5, "kl": 0.0003, "lr": 3e-5},
          "first column": {"loss": -0.00025, "reward": 150000.0, "accuracy": 1e-9, "reward_accuracy": 1.0,
                           "margin": 0.0003, "reward_margin": -37.5, "kl": 0.5, "lr": 1e-4}}


@pytest.mark.parametrize("font_size", [10, 14, 28])
@pytest.mark.parametrize(("scales", "edge_to_edge"), [("middle", False), ("first column", True)])
def test_the_curves_fixed_layout_keeps_every_label_inside_the_figure_and_off_the_other_panels(
        tmp_path, monkeypatch, font_size, scales, edge_to_edge):
    """The panels are placed by fixed margins, not measured (`tight_layout`): with wide tick labels (`SCALES`, a last
    step of "150000"), all eight panels with held-out values beside them, larger fonts (28 points: margins that grew
    with the font and a figure that did not left no room for the panels, an error that lost the report) and axes
    whose data reach their edges (`axes.xmargin` 0: the last step's label half outside its panel), no text may leave
    the figure, reach into another panel or touch another panel's texts. Each margin is needed: made 40% smaller,
    one of them fails here."""
    import matplotlib
    from matplotlib.transforms import Bbox

    from posttrain.eval.report import CURVE_KEYS

    monkeypatch.setitem(matplotlib.rcParams, "font.size", font_size)
    if edge_to_edge:
        monkeypatch.setitem(matplotlib.rcParams, "axes.xmargin", 0.0)
        monkeypatch.setitem(matplotlib.rcParams, "axes.ymargin", 0.0)
    scale = SCALES[scales]
    metrics = [{"step": 5000 * s, **{key: scale[key] * (1 + s / 7) for key in CURVE_KEYS},
                **({f"eval_{key}": scale[key] for key in CURVE_KEYS} if s % 5 == 0 else {})} for s in range(1, 31)]
    fig, renderer = _drawn_curves(metrics, tmp_path / "curves.png", "grpo on data/$a_$b.jsonl", monkeypatch)
    assert len(fig.axes) == len(CURVE_KEYS)
    whole = Bbox.from_bounds(0, 0, *fig.canvas.get_width_height())
    panels = [(ax.get_window_extent(renderer), _panel_texts(ax, renderer)) for ax in fig.axes]
    assert all(len(texts) >= 8 for _, texts in panels)
    suptitle = fig._suptitle.get_window_extent(renderer)
    for box in [suptitle] + [b for _, texts in panels for b in texts]:
        assert whole.x0 <= box.x0 and box.x1 <= whole.x1 and whole.y0 <= box.y0 and box.y1 <= whole.y1, box
    for i, (_, texts) in enumerate(panels):
        others = [box for j, (area, boxes) in enumerate(panels) if j != i for box in [area, *boxes]] + [suptitle]
        for box in texts:
            assert not any(box.overlaps(other) for other in others), (fig.axes[i].get_title(), box)


@pytest.mark.parametrize("setting", ["figure.constrained_layout.use", "figure.autolayout"])
def test_a_users_matplotlibrc_layout_engine_does_not_move_the_curves_panels(tmp_path, monkeypatch, setting):
    """A matplotlibrc that turns on a layout engine for every figure made the fixed margins a warning ("not calling
    subplots_adjust") and left the panels where the engine put them: the figures are made without one."""
    import warnings

    import matplotlib

    metrics = [{"step": s, "loss": 1 / s, "lr": 1e-5} for s in range(1, 5)]
    default, _ = _drawn_curves(metrics, tmp_path / "default.png", "sft", monkeypatch)
    monkeypatch.setitem(matplotlib.rcParams, setting, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        configured, _ = _drawn_curves(metrics, tmp_path / "configured.png", "sft", monkeypatch)
    assert [ax.get_position().bounds for ax in configured.axes] == [ax.get_position().bounds for ax in default.axes]


def test_a_report_table_writes_the_datas_statistics_as_words_not_a_python_dict(tmp_path):
    from posttrain.eval.report import write_training_report
    from posttrain.train.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    report = write_training_report(run, "sft", {"data": {"rows": 1200, "kept": 1198, "length_mean": 41.25},
                                                "truncated": False}).read_text()
    assert "| data | rows 1,200, kept 1,198, length mean 41.25 |" in report and "| truncated | False |" in report
