"""The run's progress display: phases nest under one rich display, show while they run, and a phase with nothing
else on screen leaves its final line — the only lines a console that is not a terminal gets."""

from __future__ import annotations

import io

from rich.console import Console

from posttrain.train.progress import RunProgress


def run_phases(display: RunProgress, out: io.StringIO) -> str:
    """A reference pass, then training with an evaluation inside it; the console's text while the evaluation
    is half done."""
    with display.phase("reference logprobs", 8) as bar:
        bar.advance(5)
        bar.advance(3)
    with display.phase("training", 2) as training:
        with display.phase("evaluating arith", 4) as inner:
            inner.advance(2)
            display.progress.refresh()
            during = out.getvalue()
            inner.advance(2)
        training.update(completed=2)
    return during


def test_a_terminal_shows_a_nested_phase_while_it_runs():
    out = io.StringIO()
    during = run_phases(RunProgress(console=Console(file=out, force_terminal=True, width=120)), out)
    assert "evaluating arith" in during and "2/4" in during and "training" in during
    assert "reference logprobs" in out.getvalue() and "8/8" in out.getvalue()


def test_a_log_gets_the_final_line_of_each_top_level_phase_only():
    out = io.StringIO()
    run_phases(RunProgress(console=Console(file=out, force_terminal=False, width=120)), out)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert len(lines) == 2
    assert lines[0].startswith("reference logprobs") and "8/8" in lines[0]
    assert lines[1].startswith("training") and "2/2" in lines[1]


def test_a_disabled_display_prints_nothing():
    out = io.StringIO()
    run_phases(RunProgress(enabled=False, console=Console(file=out)), out)
    assert out.getvalue() == ""


def test_appending_after_a_line_a_crash_cut_short_drops_that_line_first(tmp_path):
    """A kill in the middle of appending leaves a last line without its newline; the next append (a resumed run's)
    must not glue its first record to it, which would leave a damaged line mid-file that no resume gets past."""
    from posttrain.train.metrics import append_jsonl, read_metrics

    path = tmp_path / "samples.jsonl"
    path.write_text('{"step": 1, "completion": "a"}\n{"step": 2, "compl')
    append_jsonl(path, [{"step": 2, "completion": "b"}])
    assert read_metrics(path) == [{"step": 1, "completion": "a"}, {"step": 2, "completion": "b"}]
    path.write_text('{"step": 3, "comp')  # nothing whole before the cut
    append_jsonl(path, [{"step": 3}])
    assert path.read_text() == '{"step": 3}\n'


def test_every_part_writes_its_starting_samples_once_and_a_resumed_process_none_again(tmp_path):
    """Two held-out parts (exact match and rewards) both record step-0 samples on a fresh run; a resumed process,
    which measures the starting model again for its summary, appends none of them a second time."""
    from posttrain.eval.heldout import Evaluation, Part
    from posttrain.train.metrics import read_metrics

    samples = tmp_path / "samples.jsonl"

    def part(name):
        return Part(name, 1, lambda model, bar: ({f"eval_{name}": 1.0}, [{"completion": name}]))

    for _process in range(2):  # the first process, then the resumed one
        Evaluation([part("accuracy"), part("reward")], samples).run(None, 0)
    Evaluation([part("accuracy"), part("reward")], samples).run(None, 4)
    assert [(r["step"], r["completion"]) for r in read_metrics(samples)] == [
        (0, "accuracy"), (0, "reward"), (4, "accuracy"), (4, "reward")]


def test_a_console_that_is_not_a_terminal_is_wide_enough_for_the_final_bar_lines(monkeypatch):
    """rich gives a log file 80 columns: the training bar's last line was cut to "0:0… eta 0:00…"."""
    import io

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from posttrain.console import LOG_WIDTH, run_console

    monkeypatch.delenv("COLUMNS", raising=False)
    console = run_console()
    assert not console.is_terminal and console.width == LOG_WIDTH
    console.file = io.StringIO()
    metrics = "loss 6.269  eval_accuracy 0.125  lr 0.0001  tok/s 12,144"
    with Progress(TextColumn("sft"), BarColumn(bar_width=4), TextColumn("{task.completed}/{task.total}"),
                  TextColumn(metrics), TimeElapsedColumn(), TextColumn("eta 0:00:00"), console=console) as progress:
        progress.add_task("sft", total=400, completed=400)
    line = console.file.getvalue().strip().splitlines()[-1]
    assert "400/400" in line and metrics in line and line.endswith("eta 0:00:00") and "…" not in line
    monkeypatch.setenv("COLUMNS", "100")
    assert run_console().width == 100  # asked for


def test_a_run_without_progress_shows_no_library_bars_while_it_reads_its_data():
    """A library user's run.progress=false still printed `datasets`' bars (reading, tokenising, filtering): the CLI
    had turned them off globally, the Python API had not. Put back as they were after the block."""
    import datasets

    before = datasets.is_progress_bar_enabled()
    datasets.enable_progress_bars()
    with RunProgress(enabled=False).library_bars():
        assert not datasets.is_progress_bar_enabled()
    assert datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    with RunProgress(enabled=False).library_bars():
        assert not datasets.is_progress_bar_enabled()
    assert not datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if before else datasets.disable_progress_bars)()


def test_a_long_phase_on_a_log_file_says_how_far_it_is_at_least_every_minute(monkeypatch):
    """A reference pass over the data printed its first line to a log file when it ended (188 s for 64 pairs of a
    real model, hours for a real data set); a training step of minutes waited run.log_every steps for a line."""
    import io

    from rich.console import Console

    import posttrain.train.progress as progress_module
    from posttrain.train.progress import RunProgress, TrainProgress

    clock = iter(range(0, 10_000, 70))  # 70 s between every two reads of the clock
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: float(next(clock)))
    out = io.StringIO()
    display = RunProgress(True, Console(file=out, force_terminal=False, width=80))
    with display.phase("reference logprobs", 64) as bar:
        for _ in range(3):
            bar.advance(8)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("reference logprobs ")]
    assert lines[:3] == ["reference logprobs 8/64  elapsed 0:01:10", "reference logprobs 16/64  elapsed 0:02:20",
                         "reference logprobs 24/64  elapsed 0:03:30"]
    out.seek(0)
    out.truncate(0)
    with TrainProgress("sft", 100, display=display, log_every=50) as training:
        for step in range(4):
            training.update(step, {"loss": 1.0})
    assert [line.split()[2] for line in out.getvalue().splitlines() if line.startswith("sft step ")] == [
        "1/100", "2/100", "3/100"]  # steps of 70 s: a line each, though log_every is 50
