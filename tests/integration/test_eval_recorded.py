"""A run records its last evaluation's exact match per problem; `evaluate(reuse_recorded=True)` takes it for the
final model only where it measured the same problems the same way, and it equals decoding them again."""

from __future__ import annotations

import json
import shutil

import pytest

from posttrain import recipes
from posttrain.eval import evaluate as evaluate_module
from posttrain.eval.evaluate import EvalOptions, evaluate
from posttrain.eval.heldout import PER_PROBLEM_FILE


@pytest.fixture(scope="module")
def sft_run(pretrained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("recorded")
    result = recipes.run_stage("sft", None, [
        f"model.path={pretrained_run.final_dir}", f"run.out_dir={out}", "run.progress=false", "data.size=16",
        "train.max_steps=2", "train.batch_size=8", "train.micro_batch_size=8", "eval.problems=6",
        "eval.max_new_tokens=8", "eval_before=true"])
    return result


def _decodes(monkeypatch) -> list[int]:
    """Counts the greedy decodings `evaluate` runs."""
    calls = []
    real = evaluate_module.heldout_accuracy
    monkeypatch.setattr(evaluate_module, "heldout_accuracy",
                        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls


def test_the_last_evaluation_is_recorded_and_reused_for_the_final_model(sft_run, monkeypatch):
    record = json.loads((sft_run.run_dir / PER_PROBLEM_FILE).read_text())
    # eval_before ran first (step 0) and was overwritten by the final evaluation
    assert record["step"] == 2 and record["task"] == "arith" and record["precision"] == "fp32"
    assert len(record["accuracy"]["correct"]) == 6
    assert record["accuracy"]["accuracy"] == sft_run.summary["accuracy"]

    calls = _decodes(monkeypatch)
    options = EvalOptions(problems=6, samples=2, pass_k=(1, 2), max_new_tokens=8)
    reused = evaluate(sft_run.run_dir, EvalOptions(**{**options.__dict__, "reuse_recorded": True}), write=False)
    assert calls == []
    decoded = evaluate(sft_run.run_dir, options, write=False)
    assert calls == [1]
    for key in ("accuracy", "accuracy_ci", "problems", "completion_length", "sampled_accuracy", "categories"):
        assert reused[key] == decoded[key], key
    assert reused["per_problem"] == decoded["per_problem"]


@pytest.mark.parametrize("change", [{"problems": 5}, {"seed": 7}, {"max_new_tokens": 9}, {"precision": "bf16"},
                                    {"task": "chain"}])
def test_an_evaluation_measured_otherwise_is_decoded_again(sft_run, monkeypatch, change):
    calls = _decodes(monkeypatch)
    options = {"problems": 6, "samples": 0, "max_new_tokens": 8, "reuse_recorded": True, **change}
    evaluate(sft_run.run_dir, EvalOptions(**options), write=False)
    assert calls == [1]


def test_another_model_of_the_run_is_not_its_final_model(sft_run, monkeypatch):
    calls = _decodes(monkeypatch)
    other = sft_run.run_dir / "other-model"  # a model directory inside the run (as a checkpoint's would be)
    shutil.copytree(sft_run.final_dir, other)
    try:
        evaluate(other, EvalOptions(problems=6, samples=0, max_new_tokens=8, reuse_recorded=True), write=False)
    finally:
        shutil.rmtree(other)
    assert calls == [1]
