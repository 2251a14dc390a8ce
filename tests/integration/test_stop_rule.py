"""train.stop_when ends a run at the first step whose logged metrics meet the rule; eval.dev_problems gives it a dev
draw to read, apart from the held-out problems, which are then scored only where the run ends."""

from __future__ import annotations

import random

import pytest
import torch
from test_engine import _flat_params, _loss_fn, _trainer

from posttrain.data.config import DataConfig
from posttrain.data.tasks import get_task
from posttrain.data.tasks.base import Example, Task
from posttrain.errors import ConfigError
from posttrain.eval.accuracy import EvalConfig, dev_problems, heldout_problems
from posttrain.eval.heldout import Evaluation, Part, accuracy_part
from posttrain.train.checkpoint import list_checkpoints
from posttrain.train.engine import TrainConfig, once_per_step
from posttrain.train.metrics import read_metrics
from posttrain.train.stop_rule import StopRule


class RisingEvaluation:
    """An evaluation whose dev score is step / 10 and whose test score is measured only at a final call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, step: int, final: bool) -> dict[str, float]:
        self.calls.append((step, final))
        return {"dev_score": step / 10, **({"test_score": 1.0} if final else {})}


@pytest.mark.parametrize(("text", "rule"), [
    ("dev_step_accuracy >= 0.55", StopRule("dev_step_accuracy", ">=", 0.55)),
    ("eval_loss<1e-1", StopRule("eval_loss", "<", 0.1)),
    ("  reward > -2 ", StopRule("reward", ">", -2.0)),
    ("eval_headroom.3 steps.pass@8 <= .5", StopRule("eval_headroom.3 steps.pass@8", "<=", 0.5)),
    ("dev_accuracy => 0.5", None),
])
def test_a_stopping_rule_is_read_or_refused_naming_its_field(text, rule):
    if rule is None:
        with pytest.raises(ConfigError) as error:
            StopRule.parse(text)
        assert error.value.field == "train.stop_when"
    else:
        assert StopRule.parse(text) == rule
    for bad in ("dev_accuracy", "dev_accuracy >= high", "dev_accuracy >= 0.5 < 1", ">= 0.5"):
        with pytest.raises(ConfigError):
            TrainConfig(stop_when=bad).check()


def test_a_rule_is_met_by_its_own_comparison_only_and_never_by_a_missing_or_nan_value():
    rule = StopRule.parse("x >= 0.5")
    assert rule.met({"x": 0.5}) and rule.met({"x": 0.7}) and not rule.met({"x": 0.49})
    assert not rule.met({}) and not rule.met({"x": float("nan")}) and not rule.met({"x": "0.9"})
    assert StopRule.parse("x < 0.5").met({"x": 0.4}) and not StopRule.parse("x < 0.5").met({"x": 0.5})


def test_the_run_stops_at_the_first_evaluation_that_meets_the_rule_and_measures_its_end_there(tmp_path, tokenizer):
    evaluation = RisingEvaluation()
    trainer, source = _trainer(tmp_path, tokenizer, name="stops", steps=12, eval_every=2, save_every=0,
                               stop_when="dev_score >= 0.5")
    result = trainer.fit(source, _loss_fn, evaluation)
    # dev_score 0.2, 0.4 at steps 2, 4; 0.6 at step 6 meets it: the final evaluation runs there, once
    assert result.step == 6
    assert evaluation.calls == [(2, False), (4, False), (6, False), (6, True)]
    assert result.stopped_by == "dev_score = 0.6 >= 0.5" and result.totals()["stopped_by"] == result.stopped_by
    records = read_metrics(tmp_path / "stops" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["test_score"] == 1.0 and "test_score" not in records[1]
    assert [p.name for p in list_checkpoints(tmp_path / "stops" / "checkpoints")] == ["step-6"]

    # Resumed, the run stays ended: no step is trained, and its weights are the stopped run's.
    resumed, source = _trainer(tmp_path, tokenizer, name="stops", steps=12, eval_every=2, save_every=0,
                               stop_when="dev_score >= 0.5", resume=True)
    again = RisingEvaluation()
    result = resumed.fit(source, _loss_fn, again)
    assert result.step == 6 and again.calls == [] and result.stopped_by == "dev_score = 0.6 >= 0.5"
    assert torch.equal(_flat_params(resumed.model), _flat_params(trainer.model))
    # More steps do not undo the stop; another rule, which it has not met yet, trains on from the checkpoint.
    more, source = _trainer(tmp_path, tokenizer, name="stops", steps=20, eval_every=2, save_every=0,
                            stop_when="dev_score >= 0.5", resume=True)
    assert more.fit(source, _loss_fn, RisingEvaluation()).step == 6
    longer, source = _trainer(tmp_path, tokenizer, name="stops", steps=12, eval_every=2, save_every=0,
                              stop_when="dev_score >= 0.9", resume=True)
    assert longer.fit(source, _loss_fn, RisingEvaluation()).step == 10
    # That second rule stopped it at step 10. Trained on past that stop without a rule, the run no longer counts as
    # stopped by it: with that rule and more steps it trains on (its dev score is past 0.9 already: it stops at its
    # first evaluation, step 14).
    unruled, source = _trainer(tmp_path, tokenizer, name="stops", steps=12, eval_every=2, save_every=0,
                               stop_when=None, resume=True)
    assert unruled.fit(source, _loss_fn, RisingEvaluation()).step == 12
    again, source = _trainer(tmp_path, tokenizer, name="stops", steps=20, eval_every=2, save_every=0,
                             stop_when="dev_score >= 0.9", resume=True)
    result = again.fit(source, _loss_fn, RisingEvaluation())
    assert result.step == 14 and result.stopped_by == "dev_score = 1.4 >= 0.9"


def test_a_rule_added_on_resume_is_read_from_the_next_evaluation_on(tmp_path, tokenizer):
    """A run that ended without a rule is not taken as stopped by one its last record happens to meet: resumed with
    more steps and the rule, it trains on and stops at its next evaluation that meets it, measured there."""
    trainer, source = _trainer(tmp_path, tokenizer, name="added", steps=4, eval_every=2, save_every=0)
    trainer.fit(source, _loss_fn, RisingEvaluation())  # dev_score 0.4 at its last step
    resumed, source = _trainer(tmp_path, tokenizer, name="added", steps=12, eval_every=2, save_every=0,
                               stop_when="dev_score >= 0.3", resume=True)
    evaluation = RisingEvaluation()
    result = resumed.fit(source, _loss_fn, evaluation)
    assert result.step == 6 and evaluation.calls == [(6, False), (6, True)]
    assert result.stopped_by == "dev_score = 0.6 >= 0.3"


def test_a_rule_on_a_training_metric_is_read_every_step_and_one_never_met_runs_to_the_end(tmp_path, tokenizer):
    evaluation = RisingEvaluation()
    trainer, source = _trainer(tmp_path, tokenizer, name="lr", steps=8, save_every=0, stop_when="lr >= 3e-3")
    result = trainer.fit(source, _loss_fn, evaluation)
    # warm-up over 2 steps: the record of step 2 is the first with lr 3e-3 (the lr the step trained at)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "lr" / "metrics.jsonl")]
    assert result.step == next(i + 1 for i, lr in enumerate(lrs) if lr >= 3e-3) == 2
    assert evaluation.calls == [(2, True)]

    # never met, or met only at the last step: the run ends there as it would without a rule
    for name, rule in (("never", "dev_score > 9"), ("at-end", "dev_score >= 0.4")):
        trainer, source = _trainer(tmp_path, tokenizer, name=name, steps=4, eval_every=2, stop_when=rule)
        evaluation = RisingEvaluation()
        result = trainer.fit(source, _loss_fn, evaluation)
        assert result.step == 4 and result.stopped_by is None and "stopped_by" not in result.totals()
        assert evaluation.calls == [(2, False), (4, True)]


def test_a_metric_the_evaluations_lack_is_refused_and_one_only_a_last_evaluation_logs_is_dropped(tmp_path, tokenizer):
    trainer, source = _trainer(tmp_path, tokenizer, name="typo", steps=6, eval_every=3, stop_when="dev_scor >= 1",
                               save_every=0)
    with pytest.raises(ConfigError, match="dev_scor.*dev_score.*The run so far is saved") as error:
        trainer.fit(source, _loss_fn, RisingEvaluation())
    assert error.value.field == "train.stop_when" and trainer.step == 3
    # refused at the first evaluation, perhaps many steps in: those steps are kept, resumable
    assert (tmp_path / "typo" / "checkpoints" / "step-3").is_dir()
    assert [r["step"] for r in read_metrics(tmp_path / "typo" / "metrics.jsonl")] == [1, 2, 3]
    # evaluated only at the end (eval_every 0, or past max_steps: a short trial of a recipe): an evaluation's metric
    # cannot end the run early; it says so at its first step and runs to its end, as it would without the rule
    for name, every in (("late", 0), ("later", 100)):
        trainer, source = _trainer(tmp_path, tokenizer, name=name, steps=6, eval_every=every,
                                   stop_when="dev_score >= 0.1")
        warnings: list[str] = []
        trainer._warn = warnings.append
        evaluation = RisingEvaluation()
        result = trainer.fit(source, _loss_fn, evaluation)
        assert result.step == 6 and result.stopped_by is None and evaluation.calls == [(6, True)]
        assert len(warnings) == 1 and "cannot end this run early" in warnings[0] and "eval_every" in warnings[0]
        assert "grad_norm, loss, lr" in warnings[0]  # what its steps do log, to spot a misspelled training metric
    # a run without any evaluation logs training metrics only: a metric they lack is refused at its first step
    trainer, source = _trainer(tmp_path, tokenizer, name="none", steps=6, stop_when="eval_loss < 1")
    with pytest.raises(ConfigError, match="no evaluation; its steps log .*loss"):
        trainer.fit(source, _loss_fn)
    assert trainer.step == 1


def test_an_evaluation_skips_final_only_parts_until_the_end_and_measures_a_part_once_per_step():
    runs: list[tuple[str, int]] = []

    def part(name: str, final_only: bool) -> Part:
        def run(model, bar):
            runs.append((name, len(runs)))
            return {name: float(len(runs))}, []
        return Part(name, 1, run, final_only=final_only)

    evaluation = Evaluation([part("dev", False), part("test", True)], samples=None)
    assert evaluation.run(None, 2, final=False) == {"dev": 1.0}
    assert evaluation.run(None, 2, final=True) == {"dev": 1.0, "test": 2.0}  # dev reused, test measured
    assert evaluation.run(None, 4, final=True) == {"dev": 3.0, "test": 4.0}  # a new step measures both
    assert [name for name, _ in runs] == ["dev", "test", "dev", "test"]


def test_the_dev_draw_is_distinct_apart_from_the_heldout_problems_and_reproducible():
    task = get_task("multistep-long")
    cfg = EvalConfig(problems=300, dev_problems=200)
    test_keys = {e.key for e in heldout_problems(task, cfg.problems, cfg.seed)}
    dev = dev_problems(task, cfg.dev_problems, cfg.problems, cfg.seed)
    keys = [e.key for e in dev]
    assert len(keys) == len(set(keys)) == 200 and not test_keys & set(keys)
    assert all(task.is_heldout(e) for e in dev)
    assert keys == [e.key for e in dev_problems(task, 200, 300, cfg.seed)]
    assert keys != [e.key for e in dev_problems(task, 200, 300, cfg.seed + 1)]
    # a task with few held-out problems: a dev draw larger than what the test draw leaves is refused, by field
    with pytest.raises(ConfigError) as error:
        dev_problems(TwelveProblems(), 5, 8, cfg.seed)
    assert error.value.field == "eval.dev_problems"
    assert len(dev_problems(TwelveProblems(), 4, 8, cfg.seed)) == 4


class TwelveProblems(Task):
    name = "twelve"

    def example(self, rng: random.Random, split: str = "train") -> Example:
        n = rng.randrange(12)
        return Example(key=str(n), prompt=f"{n}?", answer=str(n), completion=str(n), wrong=())


def test_a_dev_draw_without_a_built_in_task_to_draw_from_is_refused_before_training(tokenizer):
    with pytest.raises(ConfigError) as error:
        accuracy_part(tokenizer, DataConfig(source="arith"), EvalConfig(problems=0, dev_problems=5))
    assert error.value.field == "eval.dev_problems"
    parts = accuracy_part(tokenizer, DataConfig(source="arith"), EvalConfig(problems=6, dev_problems=5))
    assert [(p.total, p.final_only) for p in parts] == [(5, False), (6, True)]


def test_an_evaluation_without_final_only_parts_measures_each_step_once():
    steps: list[int] = []
    evaluate = once_per_step(lambda step: steps.append(step) or {"eval_loss": float(step)})
    assert evaluate(2, False) == evaluate(2, True) == {"eval_loss": 2.0}  # asked again where a rule stops the run
    assert evaluate(4, True) == {"eval_loss": 4.0} and steps == [2, 4]
