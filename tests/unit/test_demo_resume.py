"""Which finished stages a demo reuses: those trained with this demo's settings from the base model that is there now;
a stage stopped after training is a stop, not a failure; one demo per directory. Recipes are stand-ins (a final/
directory and a summary), so each case takes a second."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console

import posttrain.demo as demo
from posttrain.demo import STAGES, DemoStopped, _measured_before, run_demo
from posttrain.train.run_dir import RunResult
from posttrain.train.signals import Interrupted


@pytest.fixture
def stand_in_recipes(tmp_path, monkeypatch):
    """Every stage's recipe writes its final/ and a summary (summary.json last, as a run does); returns the list of
    stages run, in order."""
    ran: list[str] = []

    def run_stage(stage, recipe, overrides, quick=False):
        name = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.name="))
        out = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.out_dir="))
        (tmp_path / out / name / "final").mkdir(parents=True, exist_ok=True)
        (tmp_path / out / name / "summary.json").write_text("{}")
        ran.append(name)
        return RunResult(run_dir=tmp_path / out / name, final_dir=tmp_path / out / name / "final",
                         summary={"accuracy": 0.5, "eval_problems": 100, "final_eval_loss": 1.0,
                                  "initial_eval_loss": 2.0, "accuracy_ci": [0.4, 0.6]})

    monkeypatch.setattr(demo.recipes, "run_stage", run_stage)
    monkeypatch.setattr(demo, "_sampled_eval", lambda *args: {})
    monkeypatch.setattr(demo, "write_demo_report", lambda *args: tmp_path / "report.md")
    monkeypatch.chdir(tmp_path)
    return ran


def _demo(stages, quick=False, fresh=False, console=None):
    return run_demo(out="demo", quick=quick, fresh=fresh, stages=stages, jobs=1,
                    console=console or Console(file=open(os.devnull, "w")))


def test_a_full_demo_does_not_reuse_what_a_quick_demo_trained(stand_in_recipes):
    """A quick demo's stages were reused by the full demo and reported as its results (60 pretraining steps)."""
    _demo(["pretrain"], quick=True)
    said = io.StringIO()
    _demo(["pretrain"], console=Console(file=said, width=200))
    assert stand_in_recipes == ["pretrain", "pretrain"]
    assert "pretrain runs again: its results are from other settings (a --quick demo" in said.getvalue()
    _demo(["pretrain"])  # the full one's now: reused
    assert stand_in_recipes == ["pretrain", "pretrain"]
    assert json.loads(open("demo/demo.json").read())["pretrain"]["demo_settings"] == {"quick": False,
                                                                                        "overrides": []}


def test_a_stage_whose_base_ran_again_is_not_reused_or_reported(stand_in_recipes):
    """`--stages pretrain --fresh` after a demo left sft (trained on the old pretrained model) in demo.json and
    reused by the next demo; the report compared it with a base it did not start from."""
    _demo(["pretrain", "sft"])
    _demo(["pretrain"], fresh=True)
    assert list(json.loads(open("demo/demo.json").read())) == ["pretrain"]
    _demo(["pretrain", "sft"])
    assert stand_in_recipes == ["pretrain", "sft", "pretrain", "sft"]
    # A base that runs again takes the stages built on it along, wanted ones in the same demo.
    summaries = json.loads(open("demo/demo.json").read())
    summaries["pretrain"]["demo_settings"]["overrides"] = ["train.max_steps=1"]  # as from another version
    open("demo/demo.json", "w").write(json.dumps(summaries))
    _demo(["pretrain", "sft"])
    assert stand_in_recipes[4:] == ["pretrain", "sft"]
    assert json.loads(open("demo/demo.json").read())["sft"]["base_finished_at"] == json.loads(
        open("demo/demo.json").read())["pretrain"]["finished_at"]


def test_a_stage_whose_run_did_not_finish_runs_again(stand_in_recipes):
    """A rerun (--fresh, or of a stage from other settings) stopped in its final export leaves a final/ half-written
    beside demo.json's entry of the run before it: that stage was reused. Its run's summary.json, written last, is
    missing; so the stage runs again."""
    _demo(["pretrain"])
    os.remove("demo/pretrain/summary.json")
    _demo(["pretrain"])
    assert stand_in_recipes == ["pretrain", "pretrain"]
    _demo(["pretrain"])
    assert stand_in_recipes == ["pretrain", "pretrain"]


def test_a_damaged_demo_json_is_one_line_unless_every_stage_runs_again(stand_in_recipes):
    """It ended the demo with JSONDecodeError's traceback; an object that is not one of stages' summaries, later."""
    from posttrain.errors import RunDirError

    _demo(["pretrain"])
    for damaged in ('{"pretrain": {"seconds": 3', "[]", '{"pretrain": 1}'):
        open("demo/demo.json", "w").write(damaged)
        with pytest.raises(RunDirError, match=r"demo.json(:1)?: is damaged .*run the demo with --fresh"):
            _demo(["pretrain"])
    assert stand_in_recipes == ["pretrain"]
    _demo(["pretrain"], fresh=True)
    assert stand_in_recipes == ["pretrain", "pretrain"]
    assert list(json.loads(open("demo/demo.json").read())) == ["pretrain"]


def test_a_stage_whose_base_has_no_results_is_refused_before_it_runs(stand_in_recipes):
    """sft dropped (pretrain ran again after it), then `--stages dpo`: dpo trained, then failed with a KeyError where
    its summary records its base's."""
    from posttrain.errors import ConfigError

    _demo(["pretrain", "sft"])
    _demo(["pretrain"], fresh=True)
    with pytest.raises(ConfigError, match="builds on 'sft', whose results are not in .*--stages sft,dpo"):
        _demo(["dpo"])
    assert stand_in_recipes == ["pretrain", "sft", "pretrain"]
    _demo(["sft", "dpo"])
    assert stand_in_recipes[3:] == ["sft", "dpo"]


def test_a_signal_during_a_stages_evaluation_is_a_stop_with_what_is_left(stand_in_recipes, monkeypatch):
    """The demo's own sampled evaluation runs after the recipe, where a SIGTERM ended the process on the spot (no
    message; a parallel demo called the stage failed)."""
    _demo(["pretrain"])

    def evaluation(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return {}

    monkeypatch.setattr(demo, "_sampled_eval", evaluation)
    with pytest.raises(Interrupted, match="stage sft had trained .* but not been evaluated") as stop:
        _demo(["sft"])
    assert stop.value.signum == signal.SIGTERM


def test_a_stage_a_signal_ended_before_its_handlers_is_stopped_not_failed(tmp_path):
    """multiprocessing reports a signal's death as -signum: the parallel demo called it a failed stage."""
    stage = next(s for s in STAGES if s.name == "sft")
    process = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])
    process.wait()
    worker = demo._Worker(stage, process, tmp_path / "sft.log", tmp_path / "sft.json", time.perf_counter())
    (tmp_path / "sft.log").write_text("")
    monkeypatch_start = demo._start_worker
    try:
        demo._start_worker = lambda *args: worker
        with pytest.raises(DemoStopped, match="stage.s. sft stopped"):
            demo._run_in_parallel([stage], tmp_path, False, {"pretrain": {}}, 2, {"sft": 1},
                                  Console(file=open(os.devnull, "w")))
    finally:
        demo._start_worker = monkeypatch_start


def test_a_second_demo_in_the_same_directory_is_refused(stand_in_recipes, tmp_path):
    """Two demos on one directory each rewrote demo.json from what they had read: the other's stages vanished."""
    _demo(["pretrain"])  # this process now holds the directory's lock, as a running demo does
    script = (f"import os; os.chdir({str(tmp_path)!r}); from posttrain.demo import run_demo; "
              "run_demo('demo', stages=['pretrain'])")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "another process is running a demo in this directory now" in result.stderr


def test_a_base_scored_on_other_problems_is_measured_again():
    """--quick: the multistep SFT model was scored on 100 problems, its GRPO stages on 50: the headline's before ->
    after compared different problem sets."""
    grpo = next(s for s in STAGES if s.name == "grpo-process")
    summaries = {"sft-multistep": {"accuracy": 0.1, "step_accuracy": 0.2, "eval_problems": 100}}
    assert _measured_before(grpo, summaries, 50) == {}
    assert _measured_before(grpo, summaries, 100) == {"accuracy_before": 0.1, "step_accuracy_before": 0.2}
