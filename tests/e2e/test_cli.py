"""The command line: every command has help, recipes list, config prints docs, errors exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from posttrain.cli import app

runner = CliRunner()
COMMANDS = ["pretrain", "sft", "resume", "demo", "eval", "report", "recipes", "config", "data"]


def test_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "posttrain", "--help"], capture_output=True, text=True, check=True)
    for command in COMMANDS:
        assert command in out.stdout


def test_help_and_the_recipe_list_do_not_import_torch():
    """`posttrain --help` in a fraction of a second, not the ~7 s that importing torch and transformers takes."""
    code = ("import sys; from posttrain.cli import app; from typer.testing import CliRunner; "
            "assert CliRunner().invoke(app, ['recipes']).exit_code == 0; "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_recipes_lists_the_shipped_recipes():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0 and "pretrain" in result.output


def test_config_prints_values_and_docs():
    result = runner.invoke(app, ["config", "pretrain", "optim.lr=0.01"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "optim.lr" in result.output and "0.01" in result.output and "Peak learning rate" in result.output


def test_config_error_is_a_message_not_a_traceback():
    result = runner.invoke(app, ["config", "pretrain", "optim.lrr=1"], terminal_width=200)
    assert result.exit_code == 2
    assert "did you mean 'optim.lr'" in result.output and "Traceback" not in result.output


def test_stage_with_existing_run_refuses_to_overwrite(tmp_path):
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "config.yaml").write_text("x: 1\n")
    result = runner.invoke(app, ["pretrain", f"run.out_dir={tmp_path}"], terminal_width=200)
    assert result.exit_code == 2 and "run.overwrite=true" in result.output


def test_eval_and_report_of_a_finished_run(pretrained_run):
    import json

    run = pretrained_run.run_dir
    result = runner.invoke(app, ["eval", str(run), "--problems", "20", "--samples", "2", "--k", "1", "--k", "2"],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "eval.json").read_text())
    assert saved["kind"] == "policy" and saved["problems"] == 20 and saved["task"] == "arith"
    assert 0 <= saved["pass@1"] <= saved["pass@2"] <= 1 and saved["samples_per_problem"] == 2
    low, high = saved["accuracy_ci"]
    assert low <= saved["accuracy"] <= high and saved["completion_length"] > 0
    assert saved["precision"] == "fp32"
    # Headroom per operator: the categories partition the problems, and "all" is the overall numbers.
    categories = saved["categories"]
    assert set(categories) <= {"all", "+", "-", "*"} and len(categories) > 2
    assert sum(c["problems"] for name, c in categories.items() if name != "all") == 20
    assert categories["all"]["pass@2"] == saved["pass@2"] and categories["all"]["accuracy"] == saved["accuracy"]
    assert saved["sampled_accuracy"] == saved["pass@1"] and 0 <= saved["intermediate_share"] <= 1
    assert "headroom per category" in result.output
    bf16 = runner.invoke(app, ["eval", str(run), "--problems", "20", "--samples", "0", "--precision", "bf16"],
                         terminal_width=200)
    assert bf16.exit_code == 0, bf16.output
    assert json.loads((run / "eval.json").read_text())["precision"] == "bf16"
    wrong = runner.invoke(app, ["eval", str(run), "--precision", "fp8"], terminal_width=200)
    assert wrong.exit_code == 2 and "precision must be one of" in wrong.output

    (run / "report.md").unlink()
    rebuilt = runner.invoke(app, ["report", str(run)], terminal_width=200)
    assert rebuilt.exit_code == 0, rebuilt.output
    assert (run / "report.md").is_file() and (run / "plots" / "curves.png").is_file()


def test_report_of_damaged_files_and_eval_of_too_many_problems_are_one_line_errors(pretrained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pretrained_run.run_dir, run, ignore=shutil.ignore_patterns("checkpoints", "final"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], lines[1][:10], *lines[2:]]) + "\n")  # torn mid-file
    result = runner.invoke(app, ["report", str(run)], terminal_width=200)
    assert result.exit_code == 2 and "metrics.jsonl:2:" in "".join(result.output.split())
    assert "Traceback" not in result.output
    (run / "summary.json").write_text('{"title": "x", "summ')
    result = runner.invoke(app, ["report", str(run)], terminal_width=200)
    assert result.exit_code == 2 and "summary.json:isdamaged" in "".join(result.output.split())  # wrapped anywhere
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["eval", str(pretrained_run.run_dir), "--samples", "4", "--k", "8"],
                           terminal_width=200)
    assert result.exit_code == 2 and "--k: pass@8 needs at least 8 samples" in result.output  # was dropped silently
    result = runner.invoke(app, ["eval", str(pretrained_run.run_dir), "--problems", "100000", "--samples", "0"],
                           terminal_width=200)
    assert result.exit_code == 2 and "--problems: task 'arith' has fewer than 100000" in " ".join(result.output.split())


def test_eval_of_a_run_finds_its_starting_model_where_the_run_was_started(tmp_path, tiny_model, tokenizer,
                                                                           monkeypatch):
    """The KL reference (and an RL checkpoint's model) is the run's model.path, relative to where it was started:
    from any other directory eval refused it, or could take another directory's runs/pretrain/final."""
    import yaml

    from posttrain.eval.evaluate import EvalOptions, _reference, resolve_target
    from posttrain.models import save_pretrained

    work = tmp_path / "work"
    save_pretrained(tiny_model, tokenizer, work / "runs" / "pretrain" / "final")
    run = work / "runs" / "sft"
    save_pretrained(tiny_model, tokenizer, run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"stage": "sft", "model": {"path": "runs/pretrain/final"},
                                                     "run": {"workdir": str(work)}}))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert _reference(resolve_target(run), EvalOptions(), tokenizer) is not None


def test_eval_and_report_reject_what_is_not_a_run(tmp_path):
    for command in ("eval", "report"):
        result = runner.invoke(app, [command, str(tmp_path)], terminal_width=200)
        assert result.exit_code == 2 and str(tmp_path) in result.output


def test_eval_of_a_path_that_is_not_there_says_so_and_names_the_runs_checkpoints(tmp_path):
    """It said "neither a run directory nor a model directory" of a checkpoint a quick demo never saved."""
    kept = tmp_path / "run" / "checkpoints"
    for step in (4, 12):
        (kept / f"step-{step}").mkdir(parents=True)
        (kept / f"step-{step}" / "COMPLETE").write_text(str(step))
    result = runner.invoke(app, ["eval", str(kept / "step-20")], terminal_width=300)
    assert result.exit_code == 2
    assert f"{kept / 'step-20'}: no such directory (the run's checkpoints: step-4, step-12)" in result.output


def test_a_stages_help_shows_its_overrides_and_where_the_settings_are():
    """The usage line lost "[key.sub=value ...]" (taken for rich markup) and named no place listing the settings."""
    result = runner.invoke(app, ["sft", "--help"], terminal_width=200)
    assert "Usage: posttrain sft [RECIPE] [key.sub=value ...]" in result.output
    assert "Every setting, with its default and doc: posttrain config sft" in result.output
    result = runner.invoke(app, ["data", "inspect", "--help"], terminal_width=300)
    from posttrain.data.tasks import TASKS
    assert all(name in " ".join(result.output.split()) for name in TASKS)
