"""Reward functions named by import path run in a child process with a hard time limit per call: a function that
hangs, crashes its interpreter or raises scores its call 0 with an error per row, the next call gets a fresh
process where needed, what it prints never reads as a score, its scores are checked as an in-process function's,
and the child dies with the trainer."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.recipes.rl import RewardConfig, build_rewards, check_reward_functions
from posttrain.rewards import Completions, WeightedRewards
from posttrain.rewards.function_process import MAX_ROWS, UserFunctionProcess

MODULE = """
import os, sys, time

def pid(batch):
    for text in batch.completions:
        if text == "hang":
            time.sleep(60)
        if text == "crash":
            os._exit(3)
        if text == "crash, leaving a process":  # the forked process keeps the reply pipe open
            left = os.fork()
            if left == 0:
                time.sleep(60)
                os._exit(0)
            with open(os.path.join(os.path.dirname(__file__), "left.pid"), "w") as out:
                out.write(str(left))
            os._exit(3)
        if text == "raise":
            1 / 0
    print('{"id": 1, "scores": [9, 9]}')  # printed, not a reply
    sys.stdout.flush()
    return [float(os.getpid())] * len(batch.completions)

def spawn_and_hang(batch):  # what it started (in its process group) must die with the trainer too
    import subprocess
    started = subprocess.Popen(["sleep", "600"])
    path = os.path.join(os.path.dirname(__file__), "started.pid")
    with open(path + ".part", "w") as out:
        out.write(str(started.pid))
    os.replace(path + ".part", path)  # whole when it appears: the trainer ends as soon as it sees it
    time.sleep(600)

def terminates_a_worker(batch):  # the usual timeout of code-running rewards: a forked worker, terminate()d
    import multiprocessing
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    worker.start()
    worker.join(0.2)
    worker.terminate()
    worker.join()
    return [1.0] * len(batch.completions)

def bad_one(batch):
    if "bad" in batch.completions:
        raise ValueError("cannot parse 'bad'")
    return [1.0] * len(batch.completions)

def sizes(batch):  # one row per completion, as a classifier's [B, 1] output: the size of the call it came in
    return [[float(len(batch.completions))] for _ in batch.completions]

def one_short(batch):
    return [1.0] * (len(batch.completions) - 1)

def words(batch):
    return ["1"] * len(batch.completions)

def edits(batch):  # normalises the batch in place
    for i in range(len(batch.completions)):
        batch.completions[i] = "edited"
        batch.prompts[i].append({"role": "user", "content": "injected"})
    return [0.0] * len(batch.completions)

def is_a(batch):
    return [float(text == "a") for text in batch.completions]

def some_none(batch):  # TRL's convention: None where the function does not apply
    return [None if text.startswith("n/a") else 1.0 for text in batch.completions]

def coin(batch):  # a stochastic reward: Python's and numpy's global generators
    import random
    import numpy
    return [random.random() + float(numpy.random.random()) for _ in batch.completions]

def lazy_torch(batch):  # imports torch in its first call
    import torch
    return torch.rand(len(batch.completions)).tolist()

def imported(batch):  # whether the child had imported each named module before the function ran
    return [float(name in sys.modules) for name in batch.completions]
"""


def _batch(*texts: str) -> Completions:
    return Completions(prompts=[[{"role": "user", "content": "q"}]] * len(texts), completions=list(texts),
                       answers=[None] * len(texts), steps=[[]] * len(texts))


def _rewards(tmp_path, function: str = "pid", **settings) -> WeightedRewards:
    module = tmp_path / "pid_reward.py"
    module.write_text(MODULE)
    cfg = load_config(RewardConfig, {"functions": {f"{module}:{function}": 1.0}, **settings})
    check_reward_functions(cfg)
    return build_rewards(cfg, task=None)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_a_function_runs_in_one_child_process_and_its_prints_are_not_scores(tmp_path):
    rewards = _rewards(tmp_path, timeout_s=30)
    first, second = rewards(_batch("a", "b")), rewards(_batch("c"))
    child = first.total[0].item()
    assert child != os.getpid() and first.total.tolist() == [child, child] and not first.errors
    assert second.total.tolist() == [child]  # the same child for every call of the run


@pytest.fixture
def _trainer_rng():
    """The tests seed the trainer's Python RNG: put its state back for the tests after them."""
    state = random.getstate()
    yield
    random.setstate(state)


def _draws(tmp_path, function: str, trainer_seed: int, calls: int, skipped: int = 0) -> list[list[float]]:
    """The scores of `calls` calls of a fresh child (as a resumed or rerun run has), the trainer's RNG seeded
    `trainer_seed` and `skipped` calls' seeds drawn before (as calls scored before a resume did)."""
    function = UserFunctionProcess(f"{tmp_path / 'pid_reward.py'}:{function}", timeout_s=60)
    random.seed(trainer_seed)
    for _ in range(skipped):
        random.getrandbits(63)
    try:
        return [function(_batch("a", "b", "c")) for _ in range(calls)]
    finally:
        function.close()


def test_a_stochastic_function_is_seeded_from_the_trainers_rng_so_a_rerun_scores_the_same(tmp_path, _trainer_rng):
    (tmp_path / "pid_reward.py").write_text(MODULE)
    first = _draws(tmp_path, "coin", 7, calls=2)
    assert len({score for call in first for score in call}) == 6  # every row and call its own draw
    assert _draws(tmp_path, "coin", 7, calls=2) == first
    assert _draws(tmp_path, "coin", 8, calls=2) != first
    assert _draws(tmp_path, "coin", 7, calls=1, skipped=1) == first[1:]  # resumed after the first call


def test_a_function_that_imports_torch_in_its_body_is_seeded_in_a_fresh_childs_first_call(tmp_path, _trainer_rng):
    (tmp_path / "pid_reward.py").write_text(MODULE)
    uninterrupted = _draws(tmp_path, "lazy_torch", 7, calls=2)  # torch imported in call 1, seeded before call 2
    assert uninterrupted[0] != uninterrupted[1]
    assert _draws(tmp_path, "lazy_torch", 7, calls=1, skipped=1) == uninterrupted[1:]  # imported in this call


def test_the_child_starts_without_torch_datasets_or_posttrains_data_package(tmp_path):
    # Each costs seconds at every start (4 s for posttrain.data on a Zen 3 EPYC), inside reward.timeout_s; the child
    # itself imports json (the control: a module it does import reads as imported).
    assert _rewards(tmp_path, "imported")(_batch("torch", "datasets", "posttrain.data", "json")).total.tolist() == [
        0.0, 0.0, 0.0, 1.0]


def test_in_process_runs_it_in_the_trainers_process(tmp_path):
    assert _rewards(tmp_path, in_process=True)(_batch("a")).total.tolist() == [float(os.getpid())]


def test_a_relative_file_path_imports_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "pid_reward.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(RewardConfig, {"functions": {"pid_reward.py:pid": 1.0}})
    check_reward_functions(cfg)
    assert build_rewards(cfg, task=None)(_batch("a")).total.item() not in (0.0, float(os.getpid()))


@pytest.mark.parametrize(("text", "words"), [
    ("hang", "did not score a batch of 2 within 5 s (reward.timeout_s): its process was killed"),
    ("crash", "exited with code 3"),
    ("raise", "ZeroDivisionError: division by zero"),
])
def test_a_call_that_hangs_crashes_or_raises_scores_zero_with_errors_and_the_next_call_runs(tmp_path, text, words):
    rewards = _rewards(tmp_path, timeout_s=5)  # the limit covers a restarted child's start-up too
    before = rewards(_batch("a")).total[0].item()
    started = time.monotonic()
    failed = rewards(_batch("ok", text))
    assert time.monotonic() - started < 20  # the hang is cut at the limit, not after its 60 s
    # A hang or a crash costs every row of the call; an exception is the row's own (the batch is retried row by
    # row, in the same child)
    failing = [1] if text == "raise" else [0, 1]
    assert failed.total[failing].tolist() == [0.0] * len(failing) and (text != "raise" or failed.total[0] > 0)
    assert [e["row"] for e in failed.errors] == failing and all(words in e["error"] for e in failed.errors)
    after = rewards(_batch("a")).total[0].item()
    assert after > 0 and (after != before) == (text != "raise")  # a new child unless the old one lived on


def test_a_crash_is_reported_as_such_and_kills_what_the_function_started(tmp_path):
    rewards = _rewards(tmp_path, timeout_s=30)
    started = time.monotonic()
    failed = rewards(_batch("crash, leaving a process"))
    assert time.monotonic() - started < 10  # not the 30 s limit, though the forked process holds the pipe open
    assert "exited with code 3" in failed.errors[0]["error"]
    left = int((tmp_path / "left.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(left) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(left)


def test_scores_are_checked_as_an_in_process_functions(tmp_path):
    # [B, 1] rows flatten, as torch.as_tensor(...).flatten() did in the trainer; a large batch (above the pipe's
    # 64 KiB both ways) is scored in calls of at most MAX_ROWS completions.
    count = 2 * MAX_ROWS + 100
    scores = _rewards(tmp_path, "sizes")(_batch(*(f"{i:>200}" for i in range(count))))
    assert scores.total.tolist() == [float(MAX_ROWS)] * (2 * MAX_ROWS) + [100.0] * 100 and not scores.errors
    with pytest.raises(ConfigError, match="returned 1 scores for 2 completions"):
        _rewards(tmp_path, "one_short")(_batch("a", "b"))
    with pytest.raises(ConfigError, match=r"must return one number \(or None\) per completion"):
        _rewards(tmp_path, "words")(_batch("a", "b"))
    scores = _rewards(tmp_path, "some_none")(_batch("a", "n/a b", "c"))  # no score is no error: it adds nothing
    assert scores.total.tolist() == [1.0, 0.0, 1.0] and not scores.errors


def test_a_part_of_a_large_batch_that_fails_costs_only_its_own_rows(tmp_path):
    texts = ["a"] * (2 * MAX_ROWS + 10)
    texts[MAX_ROWS + 3] = "crash"  # in the second part
    scores = _rewards(tmp_path, timeout_s=30)(_batch(*texts))
    failed = [i for i, value in enumerate(scores.total.tolist()) if value == 0.0]
    assert failed == list(range(MAX_ROWS, 2 * MAX_ROWS))
    assert sorted({e["row"] for e in scores.errors}) == failed and "exited with code 3" in scores.errors[0]["error"]
    first, last = scores.total[0].item(), scores.total[-1].item()
    assert first > 0 and last > 0 and first != last  # the third part in a fresh child


def test_a_module_whose_import_hangs_is_a_config_error_naming_the_timeout(tmp_path):
    slow = tmp_path / "slow_reward.py"
    slow.write_text("import time\ntime.sleep(60)\ndef f(batch):\n    return [1.0]\n")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"did not import it within 3 s") as err:
        check_reward_functions(load_config(RewardConfig, {"functions": {f"{slow}:f": 1.0}, "timeout_s": 3}))
    assert err.value.field == f"reward.functions.{slow}:f" and time.monotonic() - started < 20
    with pytest.raises(ConfigError, match="an infinite number is not a usable setting"):  # refused as it is read
        check_reward_functions(load_config(RewardConfig, {"functions": {f"{slow}:f": 1.0}, "timeout_s": "inf"}))


def test_the_child_dies_with_the_trainer_even_mid_call(tmp_path):
    (tmp_path / "pid_reward.py").write_text(MODULE)
    trainer = textwrap.dedent(f"""
        import os, sys, threading, time
        from posttrain.rewards.function_process import UserFunctionProcess
        from posttrain.rewards.user_functions import Completions
        process = UserFunctionProcess({str(tmp_path / 'pid_reward.py:pid')!r}, 60)
        process.start()
        print(process._process.pid, flush=True)
        batch = Completions(prompts=[[]], completions=["hang"], answers=[None], steps=[[]])
        threading.Thread(target=process, args=(batch,), daemon=True).start()
        time.sleep(1)
        os._exit(0)  # no clean-up: as a SIGKILL would end it
    """)
    out = subprocess.run([sys.executable, "-c", trainer], capture_output=True, text=True, timeout=60, check=True)
    child = int(out.stdout.split()[0])
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


@pytest.mark.parametrize("caller", ["main", "thread"])
def test_what_the_function_started_dies_with_the_trainer(tmp_path, caller):
    """The child died with a SIGKILLed trainer, but what the function had started lived on (re-parented to init)."""
    (tmp_path / "pid_reward.py").write_text(MODULE)
    trainer = textwrap.dedent(f"""
        import os, sys, threading, time
        from posttrain.rewards.function_process import UserFunctionProcess
        from posttrain.rewards.user_functions import Completions
        process = UserFunctionProcess({str(tmp_path / 'pid_reward.py:spawn_and_hang')!r}, 600)
        batch = Completions(prompts=[[]], completions=["a"], answers=[None], steps=[[]])

        def die_once_started():  # not after a fixed time: a busy test machine can take seconds to start the child
            deadline = time.monotonic() + 50
            while not os.path.exists({str(tmp_path / 'started.pid')!r}) and time.monotonic() < deadline:
                time.sleep(0.05)
            os._exit(0)  # no clean-up: as a SIGKILL would end it

        if {caller!r} == "main":
            threading.Thread(target=die_once_started, daemon=True).start()
            process(batch)  # the main thread started the child (PR_SET_PDEATHSIG) and waits on it
        else:
            threading.Thread(target=process, args=(batch,), daemon=True).start()
            die_once_started()
    """)
    subprocess.run([sys.executable, "-c", trainer], capture_output=True, text=True, timeout=60)
    started = int((tmp_path / "started.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(started) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _alive(started)
    if alive:
        os.kill(started, 9)
    assert not alive


def test_a_child_started_by_a_thread_outlives_that_thread(tmp_path):
    # PR_SET_PDEATHSIG fires when the *thread* that started the child ends: only children started by the main
    # thread get it; the others rely on their own watch of the trainer.
    (tmp_path / "pid_reward.py").write_text(MODULE)
    process = UserFunctionProcess(f"{tmp_path / 'pid_reward.py'}:pid", 30)
    thread = threading.Thread(target=process.start)
    thread.start()
    thread.join()
    try:
        first = process(_batch("a"))
        time.sleep(0.5)
        assert process(_batch("a")) == first and first[0] != float(os.getpid())
    finally:
        process.close()


def test_a_worker_the_function_forks_and_terminates_does_not_take_the_function_down(tmp_path):
    """The function's process kills its group on SIGTERM (to die with the trainer); a worker it forked inherited
    that handler, so terminate() killed the function itself on every batch."""
    rewards = _rewards(tmp_path, function="terminates_a_worker", timeout_s=60)
    scores = rewards(_batch("a", "b"))
    assert scores.total.tolist() == [1.0, 1.0] and scores.errors == []


def test_one_bad_completion_of_a_batch_sent_in_parts_is_the_error_of_its_row_alone(tmp_path):
    """Over 512 completions a batch goes in parts: a part whose call raised scored all its 512 rows 0."""
    from posttrain.rewards.function_process import MAX_ROWS

    rewards = _rewards(tmp_path, function="bad_one", timeout_s=60)
    texts = ["ok"] * (MAX_ROWS + 40)
    texts[MAX_ROWS + 7] = "bad"
    scores = rewards(_batch(*texts))
    assert [e["row"] for e in scores.errors] == [MAX_ROWS + 7] and "cannot parse 'bad'" in scores.errors[0]["error"]
    assert scores.total.sum().item() == len(texts) - 1


@pytest.mark.parametrize("in_process", [False, True])
def test_a_function_that_edits_its_batch_changes_nothing_the_others_see(tmp_path, in_process):
    """In the trainer's process one batch went to every function: one that edited it (stripped its completions in
    place) changed what the next one scored and what samples.jsonl kept; in a child process it was harmless."""
    module = tmp_path / "edits.py"
    module.write_text(MODULE)
    cfg = load_config(RewardConfig, {"functions": {f"{module}:edits": 1.0, f"{module}:is_a": 1.0},
                                     "in_process": in_process})
    check_reward_functions(cfg)
    batch = _batch("a", "b")
    assert build_rewards(cfg, task=None)(batch).total.tolist() == [1.0, 0.0]
    assert batch == _batch("a", "b")
