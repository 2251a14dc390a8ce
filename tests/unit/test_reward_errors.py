"""Reward functions that raise or return NaN are error records like a grader's; the error log keeps them all,
prints the first of each kind and stops a batch that is mostly errors."""

from __future__ import annotations

import json

import pytest
import torch

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


def test_an_error_record_keeps_a_multi_turn_prompt_whole_and_a_samples_line_too():
    """They kept the prompt's last message alone: a tool's result ("17"), with the system prompt and the question
    lost. A prompt of one user message stays its text."""
    from posttrain.data.schemas import message
    from posttrain.recipes.rl import sample_record
    from posttrain.rollout import Rollout

    calls = json.dumps([{"type": "function", "function": {"name": "add", "arguments": {"a": 9, "b": 8}}}])
    prompt = [message("system", "Be brief."), message("user", "What is 9+8?"),
              message("assistant", "", tool_calls=calls), message("tool", "17", tool_call_id="1")]
    shown = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 9+8?"},
             {"role": "assistant", "content": "", "tool_calls": json.loads(calls)},
             {"role": "tool", "content": "17", "tool_call_id": "1"}]
    printed = []
    rewards = WeightedRewards({"nan": (lambda b: [float("nan")] * len(b.completions), 1.0)})
    rewards.error_log = RewardErrorLog(None, max_error_fraction=1.0, echo=printed.append)
    completions = Completions(prompts=[prompt, [message("user", "q")]], completions=["It is 17.", "5"],
                              answers=["17", None], steps=[[], []])
    scores = rewards(completions)
    assert [r["prompt"] for r in rewards.error_log.pending] == [shown, "q"]
    assert "What is 9+8?" in printed[0]
    one = torch.ones(2, 1)
    rollout = Rollout(prompt_ids=one.long(), prompt_mask=one.long(), completion_ids=one.long(),
                      response_mask=one.long(), logprobs=one, finish_reasons=["eos"] * 2, texts=completions.completions,
                      prompt_index=torch.arange(2), temperature=1.0)
    assert [sample_record(1, i, rollout, completions, scores)["prompt"] for i in range(2)] == [shown, "q"]


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


def test_a_batch_function_that_raises_on_one_row_is_retried_row_by_row():
    """One bad completion of a batch scored every row 0 and, past max_error_fraction, stopped the run as if every
    sample failed: the batch is scored again one row at a time, and only the bad row is an error."""
    calls = []

    def picky(b):
        calls.append(len(b))
        if "bad" in b.completions:
            raise ValueError("cannot parse 'bad'")
        return [len(t) for t in b.completions]

    scores = WeightedRewards({"picky": (picky, 1.0)})(batch("ab", "bad", "abcd"))
    assert scores.total.tolist() == [2.0, 0.0, 4.0] and calls == [3, 1, 1, 1]
    assert [(e["function"], e["row"]) for e in scores.errors] == [("picky", 1)]
    assert scores.errors[0]["error"].startswith("ValueError: cannot parse 'bad'")


def test_a_timeout_scores_every_row_without_retrying_each():
    calls = []

    def slow(b):
        calls.append(len(b))
        raise TimeoutError("reward function slow.py did not score a batch of 3 within 600 s")

    scores = WeightedRewards({"slow": (slow, 1.0)})(batch("a", "b", "c"))
    assert calls == [3] and [e["row"] for e in scores.errors] == [0, 1, 2]
    assert scores.errors[0]["error"].startswith("TimeoutError: reward function slow.py did not score")


def test_a_number_too_large_for_a_float_names_the_function():
    with pytest.raises(ConfigError, match="reward.functions.huge: must return one number"):
        WeightedRewards({"huge": (lambda b: [10 ** 400] * len(b), 1.0)})(batch("a"))


def test_a_function_that_applies_to_no_completion_of_a_batch_is_warned_about_once(caplog):
    rewards = WeightedRewards({"none": (lambda b: [None] * len(b), 1.0)})
    with caplog.at_level("WARNING", logger="posttrain.rewards"):
        rewards(batch("a", "b"))
        rewards(batch("c"))
    assert rewards(batch("d")).total.tolist() == [0.0]
    warned = [r.getMessage() for r in caplog.records if r.name == "posttrain.rewards"]
    assert len(warned) == 1 and "returned None for every completion" in warned[0]


def test_a_function_failing_on_everything_is_not_retried_on_every_row():
    """A judge service that is down fails each row as it failed the batch: retrying 512 rows, each waiting for its
    connection to time out, looked like a hang. Two rows that fail word for word as the batch did end the retries."""
    calls = []

    def down(b):
        calls.append(len(b))
        raise ConnectionError("judge unreachable")

    scores = WeightedRewards({"judge": (down, 1.0)})(batch(*"abcdefgh"))
    assert calls == [8, 1, 1] and [e["row"] for e in scores.errors] == list(range(8))
    assert all(e["error"].startswith("ConnectionError: judge unreachable") for e in scores.errors)


def test_one_bad_prompt_at_the_head_of_a_grouped_batch_fails_its_own_rows_only():
    """A group's completions sit side by side and share their prompt's row: a row without the column the function
    reads fails every completion of its group word for word, which is no sign that the function fails on every
    prompt. The other groups keep their scores (all 8 rows scored 0 and the error log stopped the run)."""
    columns = [{"q": "A"}] * 4 + [{"q": "B", "solution": "42"}] * 4
    grouped = Completions(prompts=[[{"role": "user", "content": c["q"]}] for c in columns],
                          completions=["x"] * 4 + ["42", "no", "42", "no"], answers=[None] * 8,
                          steps=[[] for _ in columns], columns=columns)

    def by_solution(b):
        return [float(text == row["solution"]) for text, row in zip(b.completions, b.columns, strict=True)]

    scores = WeightedRewards({"sol": (by_solution, 1.0)})(grouped)
    assert scores.total.tolist() == [0.0] * 4 + [1.0, 0.0, 1.0, 0.0]
    assert [e["row"] for e in scores.errors] == [0, 1, 2, 3]
    assert all(e["error"].startswith("KeyError: 'solution'") for e in scores.errors)


def test_a_graders_own_error_survives_the_retry_row_by_row():
    from posttrain.rewards.graders.base import GradeResult

    def grader(b):
        if len(b) > 1:
            raise MemoryError("the batch did not fit")
        return GradeResult([0.5], errors=["timed out after 2 s" if b.completions[0] == "slow" else None])

    scores = WeightedRewards({"g": (grader, 1.0)})(batch("fast", "slow"))
    assert scores.total.tolist() == [0.5, 0.0]
    assert [(e["row"], e["error"].splitlines()[0]) for e in scores.errors] == [(1, "timed out after 2 s")]


def test_a_row_whose_retry_returns_the_wrong_number_of_scores_logs_no_parts_of_that_result():
    """A grader's result was kept for its parts before its length was checked: a row that returned two scores for
    one completion was an error, but logged the first of them as its parts."""
    from posttrain.rewards.graders.base import GradeResult

    def grader(b):
        if len(b) > 1:
            raise MemoryError("the batch did not fit")
        if b.completions[0] == "odd":
            return GradeResult([0.9, 0.9], components={"part": [0.9, 0.9]})
        return GradeResult([0.5], components={"part": [0.5]})

    grader.grades = True
    scores = WeightedRewards({"g": (grader, 1.0)})(batch("fast", "odd"))
    assert scores.total.tolist() == [0.5, 0.0] and [e["row"] for e in scores.errors] == [1]
    assert scores.by_function["g.part"].tolist() == [0.5, 0.0]


def test_every_batch_logs_a_graders_parts_whichever_way_it_was_scored(tmp_path):
    """A grader that raises on a batch (a row without the column its template reads) is graded row by row: its
    parts and error flags were lost for that batch, and concatenating it with a whole batch raised KeyError (dynamic
    sampling, held-out evaluation) or dropped the other batch's parts."""
    import yaml

    from posttrain.rewards.functions import Scores, grader_reward

    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"type": "multi", "calculate_output": "0.5 * exact + 0.5 * close", "graders": {
        "exact": {"type": "string_check", "operation": "eq", "input": "{{ sample.output_text }}",
                  "reference": "{{ item.solution }}"},
        "close": {"type": "string_check", "operation": "ilike", "input": "{{ sample.output_text }}",
                  "reference": "{{ item.solution }}"}}}))

    def rows(columns, texts):
        return Completions(prompts=[[{"role": "user", "content": f"q{i}"}] for i in range(len(texts))],
                           completions=texts, answers=[None] * len(texts), steps=[[] for _ in texts], columns=columns)

    rewards = WeightedRewards({"g": (grader_reward(grader_path=str(path)), 1.0)})
    whole = rewards(rows([{"solution": "42"}] * 2, ["42", "x"]))
    one_bad = rewards(rows([{"solution": "42"}, {}, {"solution": "Ab"}], ["42", "42", "xaby"]))
    names = ["g", "g.close", "g.errors", "g.exact"]
    assert sorted(whole.by_function) == sorted(one_bad.by_function) == names
    assert one_bad.total.tolist() == [1.0, 0.0, 0.5]
    assert one_bad.by_function["g.exact"].tolist() == [1.0, 0.0, 0.0]
    assert one_bad.by_function["g.close"].tolist() == [1.0, 0.0, 1.0]
    assert one_bad.by_function["g.errors"].tolist() == [0.0, 1.0, 0.0] and [e["row"] for e in one_bad.errors] == [1]
    # every row failing: the parts seen before score 0, each row is an error
    all_bad = rewards(rows([{}, {}], ["42", "x"]))
    assert sorted(all_bad.by_function) == names and all_bad.by_function["g.errors"].tolist() == [1.0, 1.0]
    both = Scores.concat([whole, one_bad, all_bad])
    assert both.by_function["g.exact"].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert [e["row"] for e in both.errors] == [3, 5, 6]
    # a grader whose first batch fails on every row still logs its error flags, and its parts join in as 0
    fresh_rewards = WeightedRewards({"g": (grader_reward(grader_path=str(path)), 1.0)})
    fresh = fresh_rewards(rows([{}, {}], ["42", "x"]))
    assert fresh.by_function["g.errors"].tolist() == [1.0, 1.0]
    joined = Scores.concat([fresh, fresh_rewards(rows([{"solution": "42"}], ["42"]))])
    assert sorted(joined.by_function) == names and joined.by_function["g.exact"].tolist() == [0.0, 0.0, 1.0]


def test_a_plain_function_logs_the_same_names_whether_it_failed_or_not():
    def flaky(b):
        if len(b) > 1 and "bad" in b.completions:
            raise ValueError("bad row")
        return [1.0] * len(b)

    rewards = WeightedRewards({"f": (flaky, 1.0)})
    assert list(rewards(batch("a", "b")).by_function) == list(rewards(batch("a", "bad")).by_function) == ["f"]
