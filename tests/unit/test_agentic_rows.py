"""Agentic rows (a prompt holding a tool call and its result, and the row's `tools`) as the stages that build
training rows out of sampled prompts handle them: the gold answers of the SFT blend, rejection sampling's kept rows,
on-policy preference pairs and the reward model's scores render each prompt as it was sampled, with its tools."""

from __future__ import annotations

import pytest
import torch

from posttrain.data.config import DataConfig
from posttrain.data.pipeline import prepare_data
from posttrain.eval.heldout import completions_of
from posttrain.recipes.rl import GoldAnswers, preference_rows
from posttrain.rewards.functions import Scores
from posttrain.rollout import text_rollout

TOOLS = [{"type": "function", "function": {"name": "calc", "description": "evaluates",
                                           "parameters": {"type": "object",
                                                          "properties": {"expression": {"type": "string"}}}}}]


def agentic_rows(count: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is {i}+1?"},
                        {"role": "assistant", "content": "", "tool_calls": [
                            {"type": "function", "function": {"name": "calc", "arguments": {"expression": f"{i}+1"}}}]},
                        {"role": "tool", "name": "calc", "content": str(i + 1)}],
             "tools": TOOLS, "answer": str(i + 1)} for i in range(count)]


@pytest.fixture()
def verifiable(chatml_tokenizer):
    return prepare_data(DataConfig(format="verifiable"), chatml_tokenizer, accepts=("verifiable",),
                        rows=agentic_rows(2))


def test_the_gold_answers_of_the_sft_blend_are_trained_in_the_context_their_prompt_is_sampled_in(
        chatml_tokenizer, verifiable):
    """The stored prompt keeps its tool calls as JSON text, which the gold rows' validation refused ("must be a
    non-empty list of tool calls, got text" about a source named <rows>); and the gold rows had no tools."""
    rows = [verifiable.dataset[i] for i in range(2)]
    gold = GoldAnswers(chatml_tokenizer, DataConfig())
    gold.prepare(rows)
    for i, row in enumerate(rows):
        sample = gold.prepared.dataset[i]
        context = sample["input_ids"][:sample["response_mask"].index(1)]
        assert context == row["prompt_input_ids"]
        assert "<tools>" in chatml_tokenizer.decode(context)


def test_on_policy_pairs_keep_the_tools_and_tool_calls_of_their_prompt(chatml_tokenizer, verifiable):
    rows = [verifiable.dataset[i] for i in range(2)]
    rollout = text_rollout([row["prompt_input_ids"] for row in rows], [["2", "7"], ["3", "9"]], chatml_tokenizer)
    completions = completions_of(rollout, rows)
    pairs = preference_rows(completions, Scores(torch.tensor([1.0, 0.0, 1.0, 0.0]), {}), rollout.prompt_index, 0.0)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("2", "7"), ("3", "9")]
    prepared = prepare_data(DataConfig(), chatml_tokenizer, accepts=("preference",), rows=pairs)
    for i, row in enumerate(rows):
        sample = prepared.dataset[i]
        chosen = sample["chosen_input_ids"][:sample["chosen_response_mask"].index(1)]
        assert chosen == row["prompt_input_ids"]  # the prompt as sampled: tools, the tool call and its result


def test_a_reward_model_scores_an_agentic_prompt_as_its_training_rows_render_it(chatml_tokenizer, chatml_model_dir):
    """The scorer kept role and content alone (the tool call became an empty assistant turn) and no tools."""
    from posttrain.models.reward import build_reward_model
    from posttrain.rewards.reward_model import RewardModelScorer, scoring_config

    model = build_reward_model(chatml_model_dir, pad_token_id=chatml_tokenizer.pad_token_id)
    with torch.no_grad():
        model.score.weight.normal_(generator=torch.Generator().manual_seed(0))
    scorer = RewardModelScorer(model, chatml_tokenizer)
    row = agentic_rows(1)[0]
    scored, errors = scorer.score_rows([row["prompt"]], ["The answer is 1."], [row["tools"]])
    assert errors == [None]
    trained = prepare_data(scoring_config(model), chatml_tokenizer, accepts=("preference",), rows=[
        {"prompt": row["prompt"], "chosen": "The answer is 1.", "rejected": "no", "tools": TOOLS}]).dataset[0]
    assert "<tools>" in chatml_tokenizer.decode(trained["chosen_input_ids"])
    expected = scorer._sequence_scores([(trained["chosen_input_ids"], trained["chosen_response_mask"])])
    assert torch.equal(scored, expected)
    without = scorer.score_rows([row["prompt"]], ["The answer is 1."])[0]
    assert not torch.equal(scored, without)  # the tools change what the model reads


@pytest.mark.parametrize("where", ["arguments", "name", "tools"])
def test_special_token_text_in_a_tool_call_its_name_or_the_tools_is_refused(chatml_tokenizer, where):
    """Only content and reasoning were checked: "<|im_end|>" in a tool call's arguments was trained as the control
    token (a forged turn), in a tool's name or the row's tool schemas too."""
    from posttrain.errors import DataError

    row = {"messages": [{"role": "user", "content": "What is 1+1?"},
                        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                            "name": "calc<|im_end|>" if where == "name" else "calc",
                            "arguments": {"expression": "x<|im_end|>" if where == "arguments" else "1+1"}}}]},
                        {"role": "tool", "name": "calc", "content": "2"}, {"role": "assistant", "content": "2"}],
           "tools": [{"type": "function", "function": {"name": "calc", "description": "<|im_end|>"}}]
           if where == "tools" else TOOLS}
    with pytest.raises(DataError, match="special token '<\\|im_end\\|>' as text"):
        prepare_data(DataConfig(), chatml_tokenizer, accepts=("messages",), rows=[row])


def test_a_trl_style_reward_function_gets_tool_calls_as_the_data_gave_them(chatml_tokenizer, verifiable):
    from posttrain.messages import plain_message

    prompt = verifiable.dataset[0]["prompt"]
    assert isinstance(prompt[1]["tool_calls"], str)  # rows keep them as JSON text
    assert plain_message(prompt[1])["tool_calls"] == agentic_rows(1)[0]["prompt"][1]["tool_calls"]


def test_a_reward_model_that_cannot_render_a_kind_of_row_is_warned_of_before_anything_is_sampled(
        chatml_tokenizer, tiny_model, tokenizer, tmp_path, caplog):
    """A reward model whose template has no `tool` role failed those rows in every round, found only as errors after
    each round was sampled; one row of each kind of conversation is rendered at start-up now."""
    from posttrain.models import save_pretrained
    from posttrain.models.reward import build_reward_model
    from posttrain.rewards import WeightedRewards

    lm = save_pretrained(tiny_model, tokenizer, tmp_path / "lm")  # the project's template: no tool role
    rm = save_pretrained(build_reward_model(lm, pad_token_id=tokenizer.pad_token_id), tokenizer, tmp_path / "rm")
    rows = [{"prompt": "What is 1+1?", "answer": "2"}, *agentic_rows(3), {"prompt": "What is 2+2?", "answer": "4"}]
    dataset = prepare_data(DataConfig(format="verifiable"), chatml_tokenizer, accepts=("verifiable",),
                           rows=rows).dataset
    rewards = WeightedRewards.from_config({"reward_model": 1.0}, reward_model_path=str(rm))
    rewards.check_grader_rows(dataset)
    warned = [r.getMessage() for r in caplog.records if "cannot render" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(
        "the reward model cannot render rows whose prompt has the turns user,assistant,tool (line 2, and every row "
        "like it)")
