"""`posttrain data inspect`: rendered samples with trained tokens highlighted, and token statistics."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from posttrain.cli import app
from posttrain.models import save_pretrained


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    from posttrain.config import ModelConfig
    from posttrain.models import build_model

    return str(save_pretrained(build_model(ModelConfig(size="tiny"), tokenizer), tokenizer,
                               tmp_path_factory.mktemp("model")))


def test_inspect_prints_samples_and_statistics(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "chat.jsonl"
    rows = [{"question": f"What is {i}+1?", "completion": str(i + 1)} for i in range(5)]
    rows.append({"question": "What is 1+1? " * 40, "completion": "2"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["data", "inspect", str(path), "columns.prompt=question", "max_length=64",
                                      "--model", model_dir, "-n", "2", "--recipe", "sft"], terminal_width=120)
    assert result.exit_code == 0, result.output
    assert "line 1" in result.output and "line 2" in result.output and "line 3" not in result.output
    assert "<|assistant|>1<|end|>" in result.output
    assert re.search(r"dropped: longer than max_length\s*│\s*1\s", result.output)
    assert "rows kept" in result.output and "length min / mean / p50 / p95 / max" in result.output


def test_inspect_reports_a_bad_row_without_a_traceback(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "a"}\n')
    result = CliRunner().invoke(app, ["data", "inspect", str(path), "--model", model_dir, "--recipe", "dpo"],
                                terminal_width=200)
    assert result.exit_code == 2
    output = "".join(result.output.split())  # rich wraps long lines, a long path anywhere in it
    assert "".join(f"error: {path}:1: rejected: chosen and rejected are identical".split()) in output
    assert "Traceback" not in output


def test_inspect_uses_the_data_settings_of_the_stage_recipe(tmp_path, model_dir, monkeypatch):
    """The shipped sft recipe trains on rows of at most 256 tokens: inspect ignored it (DataConfig's 512) and showed
    none dropped of the rows `posttrain sft` drops."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "What is 1+1?", "completion": "2"}, {"prompt": "What is 1+1? " * 40, "completion": "2"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for overrides, dropped in (([], 1), (["max_length=512"], 0)):  # an override still beats the recipe
        result = CliRunner().invoke(app, ["data", "inspect", str(path), *overrides, "--model", model_dir, "-n", "1"],
                                    terminal_width=120)
        assert result.exit_code == 0, result.output
        assert re.search(rf"dropped: longer than max_length\s*│\s*{dropped}\s", result.output), result.output


def test_inspect_refuses_a_recipe_that_reads_no_data_file(tmp_path, model_dir):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "q", "completion": "a"}\n')
    result = CliRunner().invoke(app, ["data", "inspect", str(path), "--model", model_dir, "--recipe", "pretrain"],
                                terminal_width=200)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "--recipe: the pretrain recipe reads no data file" in " ".join(result.output.split())
