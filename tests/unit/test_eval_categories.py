"""Headroom per category of a user's own data file: the `category` column is read and checked, a completion counts
as correct by one documented rule, the sampled counts are those of an independent sampling loop, and a run's summary
and report give the share of headroom captured per category (tests/integration/test_eval_categories.py: the whole
table of `posttrain eval --data` by hand, and a run's)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from posttrain.config import ModelConfig
from posttrain.data.config import DataConfig
from posttrain.data.pipeline import prepare_data
from posttrain.errors import ConfigError, DataError
from posttrain.eval import heldout
from posttrain.eval.evaluate import EvalOptions, evaluate
from posttrain.models import build_model, save_pretrained
from posttrain.rewards.functions import Scores
from posttrain.rollout import make_engine
from posttrain.rollout.base import SamplingParams


def data_file(tmp_path, categories=("add", "add", "mul", None, "mul", "add")) -> str:
    rows = [{"prompt": f"Question number {i}?", "answer": str(i), **({"category": c} if c is not None else {})}
            for i, c in enumerate(categories)]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


@pytest.fixture()
def model_dir(tokenizer, tmp_path):
    return save_pretrained(build_model(ModelConfig(size="tiny"), tokenizer, seed=0), tokenizer, tmp_path / "model")


def test_row_categories_are_text_integers_or_none_and_anything_else_names_the_line(tokenizer, tmp_path):
    def categories(*values):
        rows = [{"prompt": f"q{i}", "answer": "1", **({} if v is ... else {"category": v})}
                for i, v in enumerate(values)]
        path = tmp_path / "c.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return heldout.row_categories(prepare_data(DataConfig(source=str(path)), tokenizer, accepts=("verifiable",)))

    assert categories("add", ..., None, 3) == ["add", None, None, "3"]
    # "all" is the tables' row of every problem: a category of that name replaced it (headline numbers of a subset)
    for bad, words in (([1], "list"), (1.5, "float"), (True, "bool"), (" ", "empty category"),
                       ("all", "'all' names the row of every problem")):
        with pytest.raises(DataError, match=words) as err:
            categories("add", bad)
        assert str(err.value).startswith(f"{tmp_path / 'c.jsonl'}:2: category:")


def test_the_correct_rule():
    scores = Scores(total=torch.tensor([1.1, 0.1, 1.0, 0.5], dtype=torch.float64),
                    by_function={"correct": torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64),
                                 "mine": torch.tensor([0.2, 0.9, 0.4, 0.6], dtype=torch.float64)})
    rule = heldout.CorrectRule()
    assert rule.mask(scores).tolist() == [True, False, False, False]  # the `correct` reward decides
    assert rule.describe(scores.by_function) == "reward correct >= 1"
    mine = heldout.CorrectRule(by="mine", threshold=0.5)
    assert mine.mask(scores).tolist() == [False, True, False, True] and mine.describe(["mine"]) == "reward mine >= 0.5"
    graded = Scores(total=scores.total, by_function={"grader": scores.total})
    assert rule.mask(graded).tolist() == [True, False, True, False]  # no `correct`: the weighted total >= 1
    assert heldout.CorrectRule(threshold=0.5).mask(graded).tolist() == [True, False, True, True]
    assert rule.describe(["grader"]) == "weighted total reward >= 1"
    with pytest.raises(ConfigError, match="--correct-by: 'nosuch' is not one of the reward functions"):
        heldout.CorrectRule(by="nosuch").check(["correct", "format"], "--correct-by")


@torch.no_grad()
def test_sampled_counts_are_those_of_an_independent_sampling_loop(tokenizer, tiny_model, tmp_path):
    """sampled_scores' per-row counts are the correct samples of the same seeded generation, row by row."""
    path = data_file(tmp_path)
    rows = prepare_data(DataConfig(source=path), tokenizer, accepts=("verifiable",))
    model = tiny_model.eval()

    def has_digit(rollout, batch):
        values = torch.tensor([float(any(ch.isdigit() for ch in t)) for t in rollout.texts], dtype=torch.float64)
        return Scores(total=values, by_function={"digit": values})

    sampled = heldout.sampled_scores(model, tokenizer, rows, has_digit, 3, 5, problems=5, batch_size=6, seed=7)
    engine = make_engine("local", model, tokenizer)
    expected = []
    for row in range(5):  # each row alone, its samples seeded by the seed plus its index (the scores: 2 per call)
        rollout = engine.generate([rows.dataset[row]["prompt_input_ids"]], SamplingParams(
            max_new_tokens=5, temperature=1.0, n=3, prompt_seeds=(7 + row,)))
        expected.append(sum(any(ch.isdigit() for ch in text) for text in rollout.texts))
    assert sampled.correct == expected and sampled.n == 3
    assert sampled.rewards["digit"] == pytest.approx(sum(expected) / 15)
    # Any batch size samples the same.
    assert heldout.sampled_scores(model, tokenizer, rows, has_digit, 3, 5, problems=5, batch_size=15, seed=7) == sampled


def test_correct_without_a_task_asks_for_one(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="--task") as err:
        evaluate(model_dir, EvalOptions(data=data_file(tmp_path), samples=0), write=False)
    assert "answer" in str(err.value)
    assert not (model_dir / "eval.json").exists()


def test_a_run_summary_and_report_give_the_headroom_captured_per_category(tmp_path):
    from posttrain.eval.accuracy import EvalConfig
    from posttrain.eval.report import write_training_report
    from posttrain.train.run_dir import RunDir

    before = {"problems": 4, "accuracy": 0.25, "sampled_accuracy": 0.25, "pass@4": 0.75, "intermediate_share": 0.5}
    after = {"problems": 4, "accuracy": 0.5, "sampled_accuracy": 0.5, "pass@4": 0.75, "intermediate_share": 0.25}
    full = {"problems": 2, "accuracy": 1.0, "sampled_accuracy": 1.0, "pass@4": 1.0, "intermediate_share": 0.0}
    start = {"eval_reward": 0.1, **heldout.flat_headroom({"all": before, "a.b": before, "done": full})}
    last = {"eval_reward": 0.2, **heldout.flat_headroom({"all": after, "a.b": after, "done": full})}
    summary = heldout.summary(start, last, EvalConfig(), DataConfig(source="mine.jsonl"))

    assert summary["heldout_headroom_before"]["a.b"] == before and summary["heldout_headroom"]["all"] == after
    # (after - before) / (pass@4 before - before): greedy (0.5 - 0.25) / (0.75 - 0.25), sampled the same.
    assert summary["heldout_headroom_captured"]["a.b"] == {"sampled_accuracy": 0.5, "accuracy": 0.5}
    assert summary["heldout_headroom_captured"]["done"] == {"sampled_accuracy": None, "accuracy": None}  # no room
    assert summary["eval_reward_before"] == 0.1 and not any(k.startswith("eval_headroom") for k in summary)

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n", encoding="utf-8")
    report = write_training_report(RunDir(tmp_path), "mine", summary).read_text()
    assert "## Headroom per category" in report and "heldout headroom" not in report
    assert "| after | a.b | 4 | 50.0% | 50.0% | 75.0% | 25% | +50% | +50% |" in report
    assert "| before | a.b | 4 | 25.0% | 25.0% | 75.0% | 50% |  |  |" in report


def test_a_summary_that_cannot_be_written_whole_leaves_the_one_before(tmp_path, monkeypatch):
    """summary.json marks a run finished (`finished_steps`): a full disk while it is rewritten must not leave a torn
    file that the next resume or `posttrain report` cannot read."""
    import errno
    import os

    from posttrain.eval.report import write_training_report
    from posttrain.train.run_dir import RunDir, finished_steps

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n", encoding="utf-8")
    write_training_report(RunDir(tmp_path), "mine", {"steps": 3})
    assert finished_steps(tmp_path) == 3

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_training_report(RunDir(tmp_path), "mine", {"steps": 5, "long": "x" * 100_000})
    assert finished_steps(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "plots", "report.md", "summary.json"]


def test_reward_errors_of_an_evaluation_are_counted_and_a_broken_reward_stops_it(model_dir, tmp_path):
    """`posttrain eval --data` reported accuracy 0 and exit 0 for a reward whose every call died, and no errors."""
    rewards = tmp_path / "mine_rewards.py"
    rewards.write_text("def some(batch):\n"
                       "    return [float('nan') if '3' in p[-1]['content'] else 1.0 for p in batch.prompts]\n"
                       "def broken(batch):\n    raise RuntimeError('no judge reachable')\n")
    result = evaluate(model_dir, EvalOptions(data=data_file(tmp_path), samples=0, max_new_tokens=2,
                                             rewards=(f"{rewards}:some",)), write=False)
    assert result["reward_errors"] == 1 and result["problems"] == 6  # "Question number 3?" scores NaN
    # Worded for an evaluation: the --reward that named it, and no run directory to keep a file in.
    with pytest.raises(ConfigError, match=r"--reward.*:broken: 6 of 6 scores of this batch are errors .*no judge "
                                          r"reachable \(posttrain eval keeps no error file, the first of each kind "
                                          r"printed above\)"):
        evaluate(model_dir, EvalOptions(data=data_file(tmp_path), samples=0, max_new_tokens=2,
                                        rewards=(f"{rewards}:broken",)), write=False)


def test_summaries_are_strict_json_whatever_their_numbers(tmp_path):
    """A diverged run's NaN (a KL, a loss) was written as bare NaN, which is not JSON: strict readers refused the
    whole summary."""
    from posttrain.eval.report import write_training_report
    from posttrain.train.run_dir import RunDir

    def strict(text: str):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the file"))

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n", encoding="utf-8")
    write_training_report(RunDir(tmp_path), "mine", {"steps": 1, "kl": float("nan"), "by": {"a": [float("inf"), 2]}})
    saved = strict((tmp_path / "summary.json").read_text())
    assert saved["summary"] == {"steps": 1, "kl": None, "by": {"a": [None, 2]}}


def test_a_grader_reward_on_a_built_in_task_is_the_one_given_or_the_run_s(model_dir):
    """`--reward grader` on a built-in task was refused whatever --grader or the run's reward.grader said."""
    from posttrain.data.tasks import get_task
    from posttrain.eval.accuracy import heldout_problems
    from posttrain.eval.evaluate import sampled_metrics
    from posttrain.models import load_causal_lm, load_tokenizer

    options = EvalOptions(task="arith", problems=4, samples=2, pass_k=(1,), rewards=("grader",), max_new_tokens=4)
    task = get_task("arith")
    draw = heldout_problems(task, 4, options.seed)
    model = load_causal_lm(model_dir).eval()
    with pytest.raises(ConfigError, match="needs a grader file"):
        sampled_metrics(model, load_tokenizer(model_dir), task, draw, DataConfig(), options, 4, None)
    result, _ = sampled_metrics(model, load_tokenizer(model_dir), task, draw, DataConfig(), options, 4, None,
                                grader_path="arith-partial")
    assert 0.0 <= result["reward_grader"] <= 1.0 and "reward_grader.exact" in result
    run = evaluate(model_dir, dataclasses.replace(options, grader="arith-partial"), greedy=False, write=False)
    assert run["reward_grader"] == result["reward_grader"]  # `posttrain eval --grader` is that grader


def test_a_write_refused_by_a_read_only_disk_names_the_file_not_its_temporary(tmp_path, monkeypatch):
    """On a read-only file system the clean-up of the temporary file fails too: its error replaced the one that
    said what happened, and both named `.summary.json.tmp`, a file the user never sees."""
    import errno
    import os
    from pathlib import Path

    from posttrain.train.metrics import replace_text

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(args[0]))

    monkeypatch.setattr(os, "replace", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError) as raised:
        replace_text(tmp_path / "summary.json", "{}")
    assert raised.value.errno == errno.EROFS and raised.value.filename == str(tmp_path / "summary.json")
    monkeypatch.undo()

    def full_disk(fd):  # a write, flush or fsync that fails names no file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as raised:
        replace_text(tmp_path / "summary.json", "{}")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "summary.json")


def test_only_a_file_the_storage_refused_is_a_storage_fault():
    import errno

    from posttrain.errors import storage_fault

    assert storage_fault(OSError(errno.EPERM, "Operation not permitted")) is None  # os.kill's, not a file's
    assert storage_fault(OSError(errno.EACCES, "Permission denied", "/x/y")).message == "Permission denied"
    fault = storage_fault(OSError(errno.ENOSPC, "No space left on device"), "resume with: posttrain resume r")
    assert str(fault) == "a file could not be written (No space left on device); resume with: posttrain resume r"
    assert storage_fault(ValueError("no")) is None


def test_data_naming_a_built_in_task_is_refused_for_task(tmp_path):
    """`--data arith` read the task's training rows as if they were a file's and reported them as held-out."""
    with pytest.raises(ConfigError, match="--data: 'arith' is a built-in task, not a file: --task arith scores"):
        evaluate(tmp_path, EvalOptions(data="arith", samples=0), write=False)
