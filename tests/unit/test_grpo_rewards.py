"""Reward functions, their weighted sum, step scorers and the character -> token mapping of steps (GRPO)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from posttrain.data.tasks import get_task
from posttrain.errors import ConfigError
from posttrain.rewards import (
    REWARD_FUNCTIONS,
    Completions,
    Step,
    WeightedRewards,
    locate_steps,
    prm_step_scorer,
    register_reward_function,
    verifier_step_scorer,
)
from posttrain.rewards.steps import line_ends

PROMPT = [{"role": "user", "content": "Start with 7. Add 5. Multiply by 3. What is the result?"}]


def batch(*completions: str, answer: str = "36", steps: tuple[str, ...] = ("12", "36")) -> Completions:
    n = len(completions)
    return Completions(prompts=[PROMPT] * n, completions=list(completions), answers=[answer] * n,
                       steps=[list(steps)] * n)


def test_weighted_rewards_sum_the_functions_and_keep_each_one():
    task = get_task("multistep")
    rewards = WeightedRewards.from_config({"correct": 1.0, "format": 0.25, "steps": 0.5}, task=task)
    scores = rewards(batch("7+5=12\n12*3=36\nAnswer: 36", "7+5=12\n12*3=35\nAnswer: 35", "no idea"))
    assert_close(scores.by_function["correct"], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert_close(scores.by_function["format"], torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    assert_close(scores.by_function["steps"], torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    assert_close(scores.total, torch.tensor([1.75, 0.5, 0.0], dtype=torch.float64))


def test_registered_callables_are_reward_functions_by_name():
    @register_reward_function("test_length_reward")
    def length(completions: Completions) -> list[float]:
        return [float(len(c)) for c in completions.completions]

    assert "test_length_reward" in REWARD_FUNCTIONS
    scores = WeightedRewards.from_config({"test_length_reward": 2.0})(batch("ab", "abcd"))
    assert scores.total.tolist() == [4.0, 8.0]

    # A notebook cell run again defines the function again (same module and name): it replaces the first.
    @register_reward_function("test_length_reward")
    def length(completions: Completions) -> list[float]:  # noqa: F811
        return [-1.0] * len(completions.completions)

    assert WeightedRewards.from_config({"test_length_reward": 1.0})(batch("ab")).total.tolist() == [-1.0]

    def other(completions: Completions) -> list[float]:
        return [0.0] * len(completions.completions)

    with pytest.raises(ValueError, match=r"'test_length_reward' is already registered \(by .*\.length\)"):
        register_reward_function("test_length_reward")(other)


def test_a_reward_function_must_score_every_completion():
    rewards = WeightedRewards({"short": (lambda b: [1.0], 1.0)})
    with pytest.raises(ConfigError, match="1 scores for 2 completions") as caught:
        rewards(batch("a", "b"))
    assert caught.value.field == "reward.functions.short"
    with pytest.raises(ConfigError, match=r"one number \(or None\) per completion") as caught:
        WeightedRewards({"texts": (lambda b: ["high", "low"], 1.0)})(batch("a", "b"))
    assert caught.value.field == "reward.functions.texts"


def test_a_none_score_leaves_the_function_out_of_that_completions_total():
    """TRL's convention (its total is a nansum over the functions): None is no score, and no error."""
    rewards = WeightedRewards({"partial": (lambda b: [1.0, None], 2.0), "all": (lambda b: [0.5, 0.25], 1.0)})
    scores = rewards(batch("a", "b"))
    assert scores.total.tolist() == [2.5, 0.25] and not scores.errors


def test_task_rewards_need_a_task_and_unknown_names_are_listed():
    with pytest.raises(ValueError, match="reward.task"):
        WeightedRewards.from_config({"correct": 1.0})
    with pytest.raises(ValueError, match="allowed: .*correct"):
        WeightedRewards.from_config({"corect": 1.0}, task=get_task("arith"))
    with pytest.raises(ValueError, match="step verifier"):
        WeightedRewards.from_config({"steps": 1.0}, task=get_task("arith"))


def test_the_verifier_scores_every_step_line_at_its_newline():
    text = "7+5=12\n12*3=35\n35+1=36\nAnswer: 36"
    [steps] = verifier_step_scorer(get_task("multistep"))(batch(text))
    newlines = [i for i, ch in enumerate(text) if ch == "\n"]
    # right; wrong arithmetic; past the last gold step (wrong, whatever it computes); unlabelled: steps by place
    assert steps == [Step(1.0, newlines[0], 0), Step(0.0, newlines[1], 1), Step(0.0, newlines[2], 2)]
    assert verifier_step_scorer(get_task("multistep"))(batch("I give up")) == [[]]
    with pytest.raises(ValueError, match="no step verifier"):
        verifier_step_scorer(get_task("arith"))


def test_line_ends_point_at_each_newline_or_the_last_character():
    assert line_ends("a\n\nbc\n  \nd") == [("a", 1), ("bc", 5), ("d", 9)]
    assert line_ends("a\n") == [("a", 1)]
    assert line_ends("") == []


def test_the_prm_scorer_scores_lines_and_skips_completions_without_one():
    class FakePRM:
        def __init__(self):
            self.calls = []

        def score_steps(self, prompts, steps):
            self.calls.append(steps)
            return [[0.1 * (j + 1) for j in range(len(s))] for s in steps]

    prm = FakePRM()
    out = prm_step_scorer(prm)(batch("7+5=12\n12*3=36", "", "x\n"))
    assert prm.calls == [[["7+5=12", "12*3=36"], ["x"]]]
    assert out == [[Step(0.1, 6), Step(0.2, 13)], [], [Step(0.1, 1)]]


def test_locate_steps_finds_the_token_holding_each_character(tokenizer):
    text = "14+5=19\n19*9=171\nAnswer: 171"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    chars = [i for i, ch in enumerate(text) if ch == "\n"] + [0, len(text) - 1, len(text) + 5]
    tokens = locate_steps(tokenizer, ids, chars)
    for char, token in zip(chars[:-1], tokens[:-1], strict=True):
        before = len(tokenizer.decode(ids[:token], skip_special_tokens=True))
        through = len(tokenizer.decode(ids[:token + 1], skip_special_tokens=True))
        assert before <= char < through
    assert tokens[-1] == len(ids) - 1  # past the text: the last token (here EOS)


def test_locate_steps_places_a_step_after_a_character_split_over_byte_tokens():
    # A Llama-style byte-fallback tokenizer: "日" is three byte tokens, and a prefix ending after one or
    # two of them decodes to one replacement character per byte, longer than the text's own prefix.
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<0x{b:02X}>": b for b in range(256)} | {"a": 256, "\n": 257, "b": 258}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    text = "a日\nb"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 6 and tokenizer.decode(ids) == text
    # the newline (character 2) is token 4; "日" (character 1) ends at its last byte, token 3
    assert locate_steps(tokenizer, ids, [text.index("\n"), 1, 0]) == [4, 3, 0]
