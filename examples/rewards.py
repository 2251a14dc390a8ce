"""Reward functions for `posttrain grpo` (and ppo, rft, rejection, on-policy dpo), named by import path:

    posttrain grpo grpo data.source=examples/prompt_only.jsonl \
        'reward.functions={examples/rewards.py:matches_solution: 1.0, examples/rewards.py:brevity: 0.1}'

Two conventions are accepted. TRL's `reward_funcs` form: keyword arguments `prompts`, `completions` and every
other column of the rows (here `solution` and `difficulty`), one value per completion. posttrain's form: one
argument, a `posttrain.rewards.Completions` batch whose `columns` hold the rows. Scores are any finite numbers.
"""

import re


def matches_solution(prompts, completions, solution, **kwargs):
    """TRL's convention: 1 when the last number in the completion is the row's `solution` column."""
    scores = []
    for completion, gold in zip(completions, solution):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        numbers = re.findall(r"-?\d+", text)
        scores.append(1.0 if numbers and numbers[-1] == gold else 0.0)
    return scores


def brevity(batch):
    """posttrain's convention: minus the completion's length in characters over 20 (a penalty, below 0)."""
    return [-len(text) / 20 for text in batch.completions]
