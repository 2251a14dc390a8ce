"""Rewards: what turns completions into scores for RL, rejection sampling and evaluation.

    RewardModelScorer    a trained reward model (`posttrain rm`): one score per (prompt, completion)
    ProcessRewardScorer  a trained process reward model (`posttrain rm kind=process`): one score per step
"""

from posttrain.rewards.reward_model import ProcessRewardScorer, RewardModelScorer

__all__ = ["ProcessRewardScorer", "RewardModelScorer"]
