"""KTO recipe: `posttrain kto` end to end on the shipped example file (the policy is the reference at step 1, so
every implicit reward is 0 and the loss is 1/2 a row); cached reference logprobs equal the live ones for a row and
its mismatched pair; a bad label stops the run with the file, line and field."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from typer.testing import CliRunner

from posttrain.cli import app
from posttrain.config import load_config
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import prepare_data
from posttrain.errors import DataError
from posttrain.recipes import find_recipe
from posttrain.recipes.kto import KTOConfig, main
from posttrain.train.engine import TrainConfig
from posttrain.train.metrics import read_metrics
from posttrain.train.reference import Reference, cached_step_source, precompute_sequence_logprobs, sequence_logprobs

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "unpaired.jsonl"
FAST = ["run.progress=false", "train.save_every=0", "optim.warmup_steps=0", "eval.problems=4", "eval.samples=2",
        "eval_before=false"]


def test_posttrain_kto_trains_on_the_example_file(pretrained_run, tmp_path):
    args = ["kto", f"model.path={pretrained_run.final_dir}", f"run.out_dir={tmp_path}", f"data.source={EXAMPLE}",
            "train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=4", "optim.lr=1e-3", *FAST]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "kto"
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    first = metrics[0]
    for key in ("desirable_reward", "undesirable_reward", "reward_margin", "kl"):
        assert_close(torch.tensor(first[key]), torch.tensor(0.0), msg=key)
    assert_close(torch.tensor(first["loss"]), torch.tensor(0.5))  # 1 - sigmoid(0) for every row
    assert metrics[-1]["loss"] != first["loss"]  # it trained
    summary = json.loads((run_dir / "summary.json").read_text())["summary"]
    assert (summary["rows_desirable"], summary["rows_undesirable"]) == (10, 10)
    for name in ("report.md", "final/model.safetensors"):
        assert (run_dir / name).is_file(), name


def test_a_bad_label_is_a_data_error_naming_file_line_and_field(pretrained_run, tmp_path):
    rows = EXAMPLE.read_text().splitlines()
    bad = json.loads(rows[2]) | {"label": "yes"}
    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join([*rows[:2], json.dumps(bad), *rows[3:]]) + "\n")
    cfg = load_config(KTOConfig, find_recipe("kto").path, [f"model.path={pretrained_run.final_dir}",
                                                           f"run.out_dir={tmp_path}", f"data.source={source}", *FAST])
    with pytest.raises(DataError, match="true/false") as err:
        main(cfg)
    assert (err.value.file, err.value.line, err.value.field) == (str(source), 3, "label")
    result = CliRunner().invoke(app, ["kto", f"model.path={pretrained_run.final_dir}", f"run.out_dir={tmp_path}",
                                      f"data.source={source}", *FAST])
    assert result.exit_code == 2 and "label" in result.output


def test_cached_reference_logprobs_equal_the_live_ones_for_rows_and_their_pairs(tiny_model, tokenizer):
    for batch_mode, share in (("padded", False), ("padding_free", True), ("padding_free", False)):
        prepared = prepare_data(DataConfig(source=str(EXAMPLE), batch_mode=batch_mode, share_prompts=share), tokenizer,
                                accepts=STAGE_FORMATS["kto"])
        reference = Reference.frozen_copy(tiny_model)
        cached = precompute_sequence_logprobs(reference, prepared, batch_size=3)
        source = cached_step_source(prepared, TrainConfig(batch_size=8, micro_batch_size=8), 0, cached)
        batch = source.next_step().micro_batches[0]
        assert batch["ref_logprobs"].shape == (16,)  # 8 rows, then their 8 mismatched pairs
        assert_close(batch["ref_logprobs"], reference.sequence_logprobs(batch))
        assert_close(batch["ref_logprobs"], sequence_logprobs(tiny_model, batch))


def test_data_inspect_shows_the_label_and_the_mismatched_pair(pretrained_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["data", "inspect", str(EXAMPLE), "--model", str(pretrained_run.final_dir),
                                      "-n", "2", "--recipe", "kto"], terminal_width=120)
    assert result.exit_code == 0, result.output
    assert "line 1 · " in result.output and "· desirable" in result.output and "· undesirable" in result.output
    assert result.output.count("mismatched pair") == 2


def test_kto_resumes_bitwise_from_a_checkpoint(pretrained_run, tmp_path, resumes_bitwise):
    settings = [f"model.path={pretrained_run.final_dir}", f"run.out_dir={tmp_path}", f"data.source={EXAMPLE}",
                "train.max_steps=4", "train.save_every=2", "train.batch_size=8", "train.micro_batch_size=4",
                "optim.lr=1e-3", *FAST[:1], *FAST[2:]]

    def run(*overrides: str):
        return main(load_config(KTOConfig, find_recipe("kto").path, [*settings, *overrides]))

    full = run("run.name=full")
    metrics = resumes_bitwise(full, lambda name: run(f"run.name={name}", "run.resume=true"))
    assert len(metrics) == 4


@pytest.mark.parametrize(("desirable", "undesirable", "weights", "said"), [
    (10, 2, (1.0, 1.0), "lambda_D n_D / (lambda_U n_U) = 5.00, outside the KTO paper's [1, 4/3]: "
                        "loss.undesirable_weight=3.75 brings it to 4/3"),  # 1 * 10 / (2 * 4/3)
    (2, 10, (1.0, 1.0), "= 0.20, outside the KTO paper's [1, 4/3]: loss.undesirable_weight=0.2 brings it to 1"),
    (10, 8, (1.0, 1.0), None),  # 1.25: inside
    (4, 0, (1.0, 1.0), "every row is desirable: KTO then has no contrast between good and bad answers"),
])
def test_unbalanced_or_one_label_rows_are_warned_of_with_the_weight_that_fits(desirable, undesirable, weights, said,
                                                                            caplog):
    """Trained without a word: the setting's own doc quotes the paper's rule, and TRL warns."""
    from posttrain.recipes.kto import KTOLossConfig, check_label_balance

    check_label_balance(desirable, undesirable, KTOLossConfig(desirable_weight=weights[0],
                                                              undesirable_weight=weights[1]), "rows.jsonl")
    assert (said in caplog.text) if said else not caplog.text
