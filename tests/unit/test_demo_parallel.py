"""The parallel demo's scheduler, failure and stop handling, with small stand-in processes for the stages (each a
few lines of Python instead of a recipe), so that order, failures and signals are checked in seconds."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
from rich.console import Console

import posttrain.demo as demo
from posttrain.config import load_config
from posttrain.demo import STAGES, DemoStageFailed, DemoStopped, _ready, _run_in_parallel, _Worker, stage_threads
from posttrain.recipes import find_recipe
from posttrain.recipes.sft import SFTConfig
from posttrain.train.stop_rule import StopRule

# Every field a stage's headline reads.
SUMMARY = {"initial_eval_loss": 2.0, "final_eval_loss": 1.0, "accuracy": 0.5, "accuracy_ci": [0.4, 0.6],
           "step_accuracy": 0.5, "eval_accuracy": 0.9, "eval_margin": 1.0}

# A stand-in stage: records when it ran, then writes its summary, fails, or waits for a signal.
STAND_IN = """
import json, signal, sys, time
name, behaviour, summary_file, record = sys.argv[1:5]
if behaviour == "wait":
    signal.signal(signal.SIGINT, lambda *a: sys.exit(130))
with open(record, "a") as f:
    f.write(json.dumps({"stage": name, "event": "start", "t": time.time()}) + "\\n")
if behaviour == "fail":
    print("loading the model failed: boom", flush=True)
    sys.exit(1)
time.sleep(60 if behaviour == "wait" else 0.3)
with open(record, "a") as f:
    f.write(json.dumps({"stage": name, "event": "end", "t": time.time()}) + "\\n")
json.dump({**SUMMARY, "seconds": 0.3}, open(summary_file, "w"))
""".replace("SUMMARY", repr(SUMMARY))


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """Replace each stage's child process by STAND_IN; behaviours[name] in {"ok", "fail", "wait"}."""
    record = tmp_path / "record.jsonl"
    behaviours: dict[str, str] = {}

    def start(stage, out_dir, quick, threads):
        log, summary_file = tmp_path / f"{stage.name}.log", tmp_path / f"{stage.name}.json"
        with log.open("w") as sink:
            process = subprocess.Popen(
                [sys.executable, "-c", STAND_IN, stage.name, behaviours.get(stage.name, "ok"), str(summary_file),
                 str(record)], stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        return _Worker(stage, process, log, summary_file, time.perf_counter())

    monkeypatch.setattr(demo, "_start_worker", start)

    def events():
        return [json.loads(line) for line in record.read_text().splitlines()] if record.is_file() else []

    return behaviours, events


def run(todo, tmp_path, jobs=2, summaries=None):
    summaries = {} if summaries is None else summaries
    _run_in_parallel(todo, tmp_path, False, summaries, jobs, {s.name: 1 for s in todo}, Console(file=None))
    return summaries


def test_stages_start_once_their_base_has_finished_and_the_first_runs_alone(tmp_path, stand_ins):
    _, events = stand_ins
    summaries = run(STAGES, tmp_path, jobs=3)
    assert set(summaries) == {s.name for s in STAGES}
    assert list(json.loads((tmp_path / "demo.json").read_text())) == [s.name for s in STAGES]  # in stage order
    times = {(e["stage"], e["event"]): e["t"] for e in events()}
    for stage in STAGES:
        if stage.builds_on:
            assert times[(stage.name, "start")] >= times[(stage.builds_on, "end")], stage.name
    # pretrain (alone) overlaps nothing; the others do overlap, at most 3 at once
    others = [s.name for s in STAGES if s.name != "pretrain"]
    assert all(times[(n, "start")] >= times[("pretrain", "end")] for n in others)
    moments = sorted(times[(n, "start")] for n in others)
    running_at = [sum(times[(n, "start")] <= t < times[(n, "end")] for n in others) for t in moments]
    assert max(running_at) == 3


def test_a_failed_stage_fails_the_demo_and_nothing_new_starts(tmp_path, stand_ins):
    behaviours, events = stand_ins
    behaviours["sft"] = "fail"
    todo = [s for s in STAGES if s.name != "pretrain"]
    summaries = {"pretrain": {**SUMMARY, "seconds": 1.0}}
    with pytest.raises(DemoStageFailed, match=r"sft \(exit 1: loading the model failed: boom; log: .*sft\.log\)"):
        run(todo, tmp_path, summaries=summaries)
    started = {e["stage"] for e in events() if e["event"] == "start"}
    assert started == {"sft", "sft-multistep"}  # the two built on pretrain; nothing after the failure
    assert "sft-multistep" in summaries and "sft" not in summaries  # the one running beside it finished
    assert set(json.loads((tmp_path / "demo.json").read_text())) == {"pretrain", "sft-multistep"}


def test_a_signal_is_passed_on_to_every_running_stage_and_stops_the_demo(tmp_path, stand_ins):
    behaviours, events = stand_ins
    behaviours.update({"sft": "wait", "sft-multistep": "wait"})
    todo = [s for s in STAGES if s.name != "pretrain"]
    summaries = {"pretrain": {**SUMMARY, "seconds": 1.0}}

    def interrupt_once_both_run():
        deadline = time.time() + 30
        while len(events()) < 2 and time.time() < deadline:
            time.sleep(0.05)
        signal.raise_signal(signal.SIGINT)  # delivered to the main thread, where the demo waits

    threading.Thread(target=interrupt_once_both_run, daemon=True).start()
    start = time.perf_counter()
    with pytest.raises(DemoStopped, match="sft, sft-multistep stopped"):
        run(todo, tmp_path, summaries=summaries)
    assert time.perf_counter() - start < 30  # they stopped on the signal, not after their 60 s
    assert {e["stage"] for e in events()} == {"sft", "sft-multistep"} and set(summaries) == {"pretrain"}


def test_ready_keeps_lanes_bases_and_the_stage_that_runs_alone():
    by_name = {s.name: s for s in STAGES}
    assert [s.name for s in _ready(list(STAGES), {}, 4)] == ["pretrain"]  # alone, and everything builds on it
    waiting = [s for s in STAGES if s.name != "pretrain"]
    assert [s.name for s in _ready(waiting, {}, 4)] == ["sft-multistep", "sft"]  # the critical one first
    after_sft = [s for s in waiting if s.name not in ("sft", "sft-multistep")]
    running = {"sft-multistep": _Worker(by_name["sft-multistep"], None, None, None, 0.0)}
    assert [s.name for s in _ready(after_sft, running, 3)] == ["rm", "dpo"]  # two lanes left, stages' order
    assert not [s for s in _ready(after_sft, running, 3) if s.builds_on == "sft-multistep"]
    # once the multistep SFT is done, its GRPO stages (the rest of the longest chain) go before the others
    running = {"dpo": _Worker(by_name["dpo"], None, None, None, 0.0)}
    later = [s for s in after_sft if s.name not in ("rm", "dpo")]
    assert [s.name for s in _ready(later, running, 2)] == ["grpo-process"]
    assert [s.name for s in _ready(later, {}, 3)] == ["grpo-process", "grpo-outcome", "ppo"]


def test_a_stages_threads_depend_on_jobs_and_cores_only():
    pretrain, sft = (next(s for s in STAGES if s.name == n) for n in ("pretrain", "sft"))
    assert stage_threads(pretrain, 2, 2) == 2 and stage_threads(sft, 2, 2) == 1
    assert stage_threads(sft, 1, 8) == 8 and stage_threads(sft, 4, 8) == 2 and stage_threads(sft, 4, 2) == 1


# A stage's process: asks to be stopped when its demo dies, then waits; SIGTERM makes it say so and exit.
ORPHAN = """
import os, signal, sys, time
from posttrain.demo import DEMO_PID_VARIABLE
from posttrain.train.signals import stop_when_demo_dies
def stop(*_):
    open(marker + ".partial", "w").write("terminated")
    os.replace(marker + ".partial", marker)  # the test never reads a half-written marker
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
stop_when_demo_dies(DEMO_PID_VARIABLE)
open(marker + ".ready", "w").write("")
time.sleep(60)
"""

# The demo: starts the stage as `_start_worker` does (`StageProcess`: forked by the fork server, in a session of its
# own), then waits.
DEMO = """
import os, sys, time
from pathlib import Path
from posttrain.demo import DEMO_PID_VARIABLE, StageProcess
StageProcess(exec, (sys.argv[1], {"marker": sys.argv[2]}), Path(sys.argv[2] + ".log"),
             {DEMO_PID_VARIABLE: str(os.getpid())}, preload=())
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a process's pidfd is Linux's")
def test_a_stage_whose_demo_is_killed_gets_sigterm(tmp_path):
    marker = tmp_path / "stage"
    demo_process = subprocess.Popen([sys.executable, "-c", DEMO, ORPHAN, str(marker)])
    try:
        deadline = time.time() + 60
        while not (tmp_path / "stage.ready").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "stage.ready").exists(), "the stage never started"
        assert not marker.exists()
        demo_process.kill()  # SIGKILL: the demo can pass nothing on
        demo_process.wait()
        deadline = time.time() + 10
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists() and marker.read_text() == "terminated"
    finally:
        demo_process.kill()


def test_the_full_multistep_sft_stops_on_a_dev_draw_and_the_quick_one_runs_its_steps():
    stage = next(s for s in STAGES if s.name == "sft-multistep")
    full = load_config(SFTConfig, find_recipe("sft").path, [*stage.overrides, *stage.budget])
    full.train.check()
    assert StopRule.parse(full.train.stop_when) == StopRule("dev_step_accuracy", ">=", 0.45)
    assert 0 < full.train.eval_every < full.train.max_steps and full.eval.dev_problems > 0
    quick = load_config(SFTConfig, find_recipe("sft").path, list(stage.overrides))
    assert quick.train.stop_when is None and quick.eval.dev_problems == 0
