"""Reward functions named by import path (posttrain's and TRL's signatures) reading every column of their rows,
graders reading any column, and prompt-only data refused by rewards that need a gold answer."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from posttrain.config import load_config
from posttrain.data.config import DataConfig
from posttrain.errors import ConfigError, DataError
from posttrain.recipes.rl import RewardConfig, build_rewards, check_gold_answers, check_reward_functions
from posttrain.rewards import Completions, WeightedRewards
from posttrain.rewards.graders import build_grader, completion_records

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ROWS = [{"prompt": "What is 2+3?", "solution": "5", "difficulty": "easy"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 4*4?"}],
         "solution": "16", "difficulty": "hard"}]


def _batch(texts: list[str]) -> Completions:
    prompts = [[{"role": "user", "content": "What is 2+3?", "reasoning": None}],
               [{"role": "system", "content": "Be brief.", "reasoning": None},
                {"role": "user", "content": "What is 4*4?", "reasoning": None}]]
    return Completions(prompts=prompts, completions=texts, answers=[None, None], steps=[[], []], columns=ROWS)


def _rewards(*functions: str) -> WeightedRewards:
    cfg = load_config(RewardConfig, {"functions": dict.fromkeys(functions, 1.0)})
    check_reward_functions(cfg)
    return build_rewards(cfg, task=None)


def test_trl_style_function_from_a_file_reads_the_rows_columns():
    scores = _rewards(f"{EXAMPLES}/rewards.py:matches_solution")(_batch(["It is 5", "4*4 = 15"]))
    assert scores.total.tolist() == [1.0, 0.0]


def test_a_column_named_as_trls_completions_argument_is_a_one_line_error_of_the_rows():
    """It was "TypeError: got multiple values for keyword argument 'completions'" from deep in the adapter."""
    batch = _batch(["It is 5", "16"])
    batch = Completions(prompts=batch.prompts, completions=batch.completions, answers=batch.answers,
                        steps=batch.steps, columns=[{**row, "completions": 3} for row in ROWS])
    scores = _rewards(f"{EXAMPLES}/rewards.py:matches_solution")(batch)
    assert scores.total.tolist() == [0.0, 0.0] and len(scores.errors) == 2
    assert scores.errors[0]["error"].splitlines()[0] == (
        "ValueError: the rows have a column 'completions', the name TRL's convention passes the completions in: "
        "rename that column in the data")


def test_trl_style_gets_text_for_text_rows_and_messages_for_conversations(tmp_path, monkeypatch):
    module = tmp_path / "spy_rewards.py"
    # The function runs in a child process: what it saw comes back through a file.
    module.write_text("import json, pathlib\n"
                      "def spy(prompts, completions, difficulty):\n"
                      "    seen = pathlib.Path(__file__).with_name('seen.json')\n"
                      "    seen.write_text(json.dumps([prompts, completions, difficulty]))\n"
                      "    return [len(d) for d in difficulty]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    scores = _rewards("spy_rewards:spy")(_batch(["It is 5", "16"]))
    prompts, completions, difficulty = json.loads((tmp_path / "seen.json").read_text())
    assert prompts == ["What is 2+3?", [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "What is 4*4?"}]]
    assert completions == ["It is 5", [{"role": "assistant", "content": "16"}]]
    assert difficulty == ["easy", "hard"]
    assert scores.total.tolist() == [4.0, 4.0]  # any finite number, not only [0, 1]


def test_posttrain_style_function_gets_the_batch_with_columns():
    scores = _rewards(f"{EXAMPLES}/rewards.py:brevity")(_batch(["It is 5", "16"]))
    torch.testing.assert_close(scores.total, torch.tensor([-7 / 20, -2 / 20], dtype=torch.float64))


@pytest.mark.parametrize(("name", "words"), [
    ("no_such_module_xyz:f", "cannot import the reward function module 'no_such_module_xyz'"),
    ("missing/rewards.py:f", "not found"),
    (f"{EXAMPLES}/rewards.py:nope", "has no function 'nope' (it has: brevity, matches_solution"),
    ("rewards.py", "unknown reward function"),
])
def test_bad_import_paths_are_config_errors_at_start_up(name, words):
    with pytest.raises(ConfigError) as err:
        check_reward_functions(load_config(RewardConfig, {"functions": {name: 1.0}}))
    assert words in str(err.value) and err.value.field.startswith("reward.functions")


def test_a_module_that_fails_to_import_is_named(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('no GPU here')\n")
    with pytest.raises(ConfigError, match="RuntimeError: no GPU here"):
        check_reward_functions(load_config(RewardConfig, {"functions": {f"{broken}:f": 1.0}}))


def test_import_path_from_a_cli_override(tmp_path):
    cfg = load_config(RewardConfig, None, [f"functions.{EXAMPLES}/rewards.py:matches_solution=1.0"])
    assert cfg.functions == {f"{EXAMPLES}/rewards.py:matches_solution": 1.0}


def test_graders_read_any_column_of_the_row():
    grader = build_grader({"type": "string_check", "operation": "eq", "input": "{{ sample.output_text }}",
                           "reference": "{{ item.solution }}"})
    batch = _batch(["5", "17"])
    samples, items = completion_records(batch.prompts, batch.completions, batch.answers, batch.steps, batch.columns)
    assert items[1]["difficulty"] == "hard" and items[1]["question"] == "What is 4*4?"
    assert grader.grade(samples, items).scores == [1.0, 0.0]


def _stage(functions: dict[str, float], task: str | None = None) -> SimpleNamespace:
    """The sections of a stage's config that the gold-answer check reads."""
    return SimpleNamespace(reward=load_config(RewardConfig, {"functions": functions, "task": task}),
                           data=DataConfig(source="data.jsonl"))


def test_prompt_only_rows_are_refused_by_rewards_that_need_an_answer():
    rows = {"line": [1, 2, 3], "answer": ["5", None, "7"]}
    with pytest.raises(DataError) as err:
        check_gold_answers(rows, "data.jsonl", _stage({"correct": 1.0}))
    assert (err.value.file, err.value.line, err.value.field) == ("data.jsonl", 2, "answer")
    check_gold_answers(rows, "data.jsonl", _stage({"coin": 1.0}))  # no answer read
    with pytest.raises(DataError, match="sft_coef"):
        check_gold_answers(rows, "data.jsonl", _stage({"coin": 1.0}), uses_gold=True)


def test_gold_answers_are_read_as_the_task_reads_answers_and_unreadable_ones_are_refused():
    """The completion's answer was normalised ("05" -> "5") but the gold only stripped: a file answering "05",
    "+5", "5.0" or "1,000" scored every right completion 0, with no warning."""
    from posttrain.data.tasks import get_task

    arith, sort = get_task("arith"), get_task("sort")
    for gold in ("5", " 5 ", "05", "+5", "5.0", "5.00"):
        assert arith.verify("The answer is 5.", gold) == 1.0, gold
    assert arith.verify("1000", "1,000") == 1.0 and arith.verify("-3", "-3") == 1.0
    assert arith.verify("5", "6") == 0.0 and arith.verify("5", "5.5") == 0.0
    assert sort.verify("1 2 10", "1, 2, 10") == 1.0 and sort.verify("1 2 10", "01 2 10") == 1.0
    rows = {"line": [1, 2, 3], "answer": ["5", "05", "12 apples"]}
    with pytest.raises(DataError, match="'12 apples' is not an answer the arith task's check can match") as err:
        check_gold_answers(rows, "data.jsonl", _stage({"correct": 1.0}, task="arith"))
    assert (err.value.line, err.value.field) == (3, "answer")
    check_gold_answers(rows, "data.jsonl", _stage({"coin": 1.0}, task="arith"))  # the task's check is not used

