"""`posttrain demo --quick`: every stage runs (pretrain: the session's shared quick run, reused), two at a time, and
leaves loadable models and reports."""

from __future__ import annotations

import json
import shutil

from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from posttrain.cli import app
from posttrain.demo import STAGES, usable_cores


def test_demo_quick_runs_every_stage(tmp_path, pretrained_run):
    out = tmp_path / "demo"
    # The demo's pretrain stage is `pretrain --quick` as shipped, which the session's shared run already is
    # (conftest.pretrained_run): it goes where the demo reuses a finished stage, and every later stage runs on it.
    pretrain = next(s for s in STAGES if s.name == "pretrain")
    assert not pretrain.overrides and not pretrain.budget and pretrain.recipe is None
    shutil.copytree(pretrained_run.run_dir, out / "pretrain")
    (out / "demo.json").write_text(json.dumps({"pretrain": {**pretrained_run.summary, "seconds": 0.0,
                                                            "demo_settings": {"quick": True, "overrides": []}}}))
    # Two stages at once, each in its own process (the default on 2 cores), each with its own log.
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--jobs", "2"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "reused" in result.output and "finished grpo-outcome" in result.output
    post_training = [s for s in STAGES if s.name != "pretrain"]
    for stage in post_training:
        assert "posttrain demo" in (out / "logs" / f"{stage.name}.log").read_text(), stage.name
    summaries = json.loads((out / "demo.json").read_text())
    assert list(summaries) == [s.name for s in STAGES]
    assert all(summaries[s.name]["threads"] == max(1, usable_cores() // 2) for s in post_training)  # cores / jobs
    for stage in STAGES:
        run = out / stage.name
        for name in ("config.yaml", "metrics.jsonl", "report.md", "plots/curves.png"):
            assert (run / name).is_file(), f"{stage.name}/{name}"
        AutoTokenizer.from_pretrained(run / "final", local_files_only=True)
        AutoModelForCausalLM.from_pretrained(run / "final", local_files_only=True)
    assert 0.0 <= summaries["sft"]["accuracy"] <= 1.0
    for stage in STAGES:
        if stage.is_policy and stage.builds_on != "pretrain":  # every post-training stage: KL to its start, pass@k
            assert summaries[stage.name]["kl_to_base"] is not None and "pass@1" in summaries[stage.name]
    report = (out / "report.md").read_text()
    for stage in STAGES:
        assert f"| {stage.name} |" in report
    # Headroom per category for every policy stage, before (its start) and after, with the share captured.
    assert set(summaries["grpo"]["headroom"]) == {"all", "++", "+-", "-+", "--"}
    assert set(summaries["sft-multistep"]["headroom"]) - {"all"} <= {"4 steps", "5 steps"}  # multistep-long
    steps = summaries["grpo-process"]["per_problem"]["steps_right"]  # paired process - outcome comparison
    assert len(steps) == len(summaries["grpo-process"]["per_problem"]["greedy"]) and all(0 <= s <= 1 for s in steps)
    assert "- grpo-process − grpo-outcome: greedy" in (out / "report.md").read_text()
    categories = summaries["grpo-process"]["per_problem"]["category"]  # where a difference lives, per kind of problem
    assert len(categories) == len(steps) and set(categories) == {"4 steps", "5 steps"}
    assert "  - steps right by category: 4 steps " in report and "  - greedy by category: ++ " in report
    assert "with stages side by side (their own times add up to" in report
    assert "## Headroom per category" in report and "| grpo | +- |" in report
    for plot in ("accuracy", "curves", "reward_vs_kl", "headroom"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 10_000, plot

    again = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--stages", "sft"], terminal_width=200)
    assert again.exit_code == 0 and "reused" in again.output


def test_demo_rejects_an_unknown_stage(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--stages", "sfx"], terminal_width=200)
    assert result.exit_code == 2 and "unknown demo stage" in result.output


def test_a_stage_stopped_in_its_loop_stops_the_demo_with_a_nonzero_exit(tmp_path, monkeypatch):
    """A stage a signal stopped returns no final model (its recipe saved a checkpoint and said so): the demo must
    not go on, write a summary for it or exit 0 as if it had finished."""
    import signal

    import posttrain.demo
    from posttrain.train.signals import StoppedInTraining

    def stopped(stage, recipe, overrides, quick=False):
        raise StoppedInTraining(signal.SIGINT, 3, str(tmp_path / "pretrain" / "checkpoints" / "step-3"), "...")

    monkeypatch.setattr(posttrain.demo.recipes, "run_stage", stopped)
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path), "--jobs", "1"], terminal_width=200)
    assert result.exit_code == 130, result.output
    assert "stopped in stage pretrain at step 3" in " ".join(result.output.split())
    assert not (tmp_path / "demo.json").exists()


def test_a_stages_own_evaluation_runs_on_the_stages_share_of_the_cores(tmp_path, monkeypatch):
    """A stage's main gives the process's thread count back when it returns: the demo's evaluation of the stage
    after it then ran on every core in each of the stages run side by side."""
    import torch

    import posttrain.demo
    from posttrain.train.run_dir import RunResult

    seen = []
    monkeypatch.setattr(posttrain.demo.recipes, "run_stage", lambda *args, **kwargs: RunResult(
        run_dir=tmp_path / "sft", final_dir=tmp_path / "sft" / "final", summary={}))
    monkeypatch.setattr(posttrain.demo, "_sampled_eval",
                        lambda stage, run_dir, summary, quick: seen.append(torch.get_num_threads()) or {})
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    sft = next(stage for stage in posttrain.demo.STAGES if stage.name == "sft")
    posttrain.demo._run_stage(sft, tmp_path, True, {}, threads=wanted)
    assert seen == [wanted] and torch.get_num_threads() == before
