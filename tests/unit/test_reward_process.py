"""Reward functions named by import path run in a child process with a hard timeout per batch: a function that
hangs, crashes its interpreter or raises scores its batch 0 with an error per row, the next batch gets a fresh
process, and what it prints never reads as a score."""

from __future__ import annotations

import os
import time

import pytest

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.recipes.rl import RewardConfig, build_rewards, check_reward_functions
from posttrain.rewards import Completions, WeightedRewards

MODULE = """
import os, sys, time

def pid(batch):
    for text in batch.completions:
        if text == "hang":
            time.sleep(60)
        if text == "crash":
            os._exit(3)
        if text == "raise":
            1 / 0
    print('{"id": 1, "scores": [9, 9]}')  # printed, not a reply
    sys.stdout.flush()
    return [float(os.getpid())] * len(batch.completions)
"""


def _batch(*texts: str) -> Completions:
    return Completions(prompts=[[{"role": "user", "content": "q"}]] * len(texts), completions=list(texts),
                       answers=[None] * len(texts), steps=[[]] * len(texts))


def _rewards(tmp_path, **settings) -> WeightedRewards:
    module = tmp_path / "pid_reward.py"
    module.write_text(MODULE)
    cfg = load_config(RewardConfig, {"functions": {f"{module}:pid": 1.0}, **settings})
    check_reward_functions(cfg)
    return build_rewards(cfg, task=None)


def test_a_function_runs_in_one_child_process_and_its_prints_are_not_scores(tmp_path):
    rewards = _rewards(tmp_path, timeout_s=30)
    first, second = rewards(_batch("a", "b")), rewards(_batch("c"))
    child = first.total[0].item()
    assert child != os.getpid() and first.total.tolist() == [child, child] and not first.errors
    assert second.total.tolist() == [child]  # the same child for every batch of the run


def test_in_process_runs_it_in_the_trainers_process(tmp_path):
    assert _rewards(tmp_path, in_process=True)(_batch("a")).total.tolist() == [float(os.getpid())]


@pytest.mark.parametrize(("text", "words"), [
    ("hang", "did not score a batch of 2 within 1 s (reward.timeout_s): its process was killed"),
    ("crash", "exited with code 3"),
    ("raise", "ZeroDivisionError: division by zero"),
])
def test_a_batch_that_hangs_crashes_or_raises_scores_zero_with_errors_and_the_next_batch_runs(tmp_path, text, words):
    rewards = _rewards(tmp_path, timeout_s=1)
    before = rewards(_batch("a")).total[0].item()
    started = time.monotonic()
    failed = rewards(_batch("ok", text))
    assert time.monotonic() - started < 10  # the hang is cut at the timeout, not after its 60 s
    assert failed.total.tolist() == [0.0, 0.0]
    assert [e["row"] for e in failed.errors] == [0, 1] and all(words in e["error"] for e in failed.errors)
    after = rewards(_batch("a")).total[0].item()
    assert after > 0 and (after != before) == (text != "raise")  # a new child unless the old one lived on


def test_a_module_whose_import_hangs_is_a_config_error_naming_the_timeout(tmp_path):
    slow = tmp_path / "slow_reward.py"
    slow.write_text("import time\ntime.sleep(60)\ndef f(batch):\n    return [1.0]\n")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"did not import within 1 s") as err:
        check_reward_functions(load_config(RewardConfig, {"functions": {f"{slow}:f": 1.0}, "timeout_s": 1}))
    assert err.value.field == f"reward.functions.{slow}:f" and time.monotonic() - started < 10
