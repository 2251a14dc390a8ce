"""Reward functions that raise or return NaN are error records like a grader's; the error log keeps them all,
prints the first of each kind and stops a batch that is mostly errors."""

from __future__ import annotations

import json

import pytest

from posttrain.errors import ConfigError
from posttrain.rewards import Completions, WeightedRewards
from posttrain.rewards.error_log import RewardErrorLog


def batch(*texts: str) -> Completions:
    return Completions(prompts=[[{"role": "user", "content": "q"}]] * len(texts), completions=list(texts),
                       answers=[None] * len(texts), steps=[[] for _ in texts])


def raising(batch):
    raise KeyError("solution")


def test_raising_and_nan_rewards_are_errors_scored_zero():
    rewards = WeightedRewards({"bad": (raising, 1.0),
                               "nan": (lambda b: [float("nan") if t == "x" else 0.5 for t in b.completions], 2.0)})
    scores = rewards(batch("x", "y"))
    assert scores.total.tolist() == [0.0, 1.0]
    assert [(e["function"], e["row"]) for e in scores.errors] == [("bad", 0), ("bad", 1), ("nan", 0)]
    assert scores.errors[0]["error"].startswith("KeyError: 'solution'") and "Traceback" in scores.errors[0]["error"]
    assert "nan" in scores.errors[2]["error"]


def test_error_log_keeps_prints_first_of_each_kind_and_stops_past_the_fraction(tmp_path):
    printed = []
    rewards = WeightedRewards({"nan": (lambda b: [float("nan") if t == "x" else 1.0 for t in b.completions], 1.0)})
    rewards.error_log = RewardErrorLog(tmp_path, max_error_fraction=0.5, echo=printed.append)
    rewards(batch("x", "y"))  # 1 of 2: not more than half
    rewards(batch("x", "y"))
    assert len(printed) == 1 and "'x'" in printed[0]
    with pytest.raises(ConfigError, match=r"reward.functions.nan: 2 of 3 scores"):
        rewards(batch("x", "x", "y"))
    records = [json.loads(line) for line in (tmp_path / "grader_errors.jsonl").read_text().splitlines()]
    assert [(r["call"], r["row"]) for r in records] == [(1, 0), (2, 0), (3, 0), (3, 1)]
    assert all(r["completion"] == "x" and r["prompt"] == "q" for r in records)


def test_under_torchrun_each_rank_appends_its_errors_with_its_rank(tmp_path, monkeypatch):
    nan = WeightedRewards({"nan": (lambda b: [float("nan")] * len(b.completions), 1.0)})
    for rank in (1, 0):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        nan.error_log = RewardErrorLog(tmp_path, max_error_fraction=1.0, echo=lambda text: None)
        nan(batch(f"from rank {rank}"))
    records = [json.loads(line) for line in (tmp_path / "grader_errors.jsonl").read_text().splitlines()]
    assert [(r["rank"], r["completion"]) for r in records] == [(1, "from rank 1"), (0, "from rank 0")]


def test_errors_scored_before_the_run_directory_exists_are_kept_once_it_does(tmp_path):
    nan = WeightedRewards({"nan": (lambda b: [float("nan"), 1.0], 1.0)})
    nan.error_log = log = RewardErrorLog(None, echo=lambda text: None)
    nan(batch("x", "y"))
    assert not list(tmp_path.iterdir())
    log.attach(tmp_path)
    nan(batch("z", "w"))
    records = [json.loads(line) for line in (tmp_path / "grader_errors.jsonl").read_text().splitlines()]
    assert [(r["call"], r["completion"]) for r in records] == [(1, "x"), (2, "z")] and "rank" not in records[0]
