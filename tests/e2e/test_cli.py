"""The command line: every command has help, recipes list, config prints docs, errors exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from posttrain.cli import app

runner = CliRunner()
COMMANDS = ["pretrain", "sft", "resume", "demo", "recipes", "config", "data"]


def test_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "posttrain", "--help"], capture_output=True, text=True, check=True)
    for command in COMMANDS:
        assert command in out.stdout


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
