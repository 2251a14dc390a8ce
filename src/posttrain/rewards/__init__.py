"""Rewards: what turns completions into scores for RL, rejection sampling and evaluation.

    RewardModelScorer       a trained reward model (`posttrain rm`): one score per (prompt, completion)
    ProcessRewardScorer     a trained process reward model (`posttrain rm prm`): one score per step
    WeightedRewards         r = sum_k w_k f_k over named reward functions (task verifiers, a reward model,
                            any callable registered with `register_reward_function`)
    verifier_step_scorer,   a score and an end position for every reasoning step (process supervision),
    prm_step_scorer         from the task's step verifier or from a process reward model
"""

from posttrain.rewards.functions import (
    REWARD_FUNCTIONS,
    Completions,
    RewardFunction,
    Scores,
    WeightedRewards,
    register_reward_function,
)
from posttrain.rewards.reward_model import ProcessRewardScorer, RewardModelScorer
from posttrain.rewards.steps import Step, StepScorer, locate_steps, prm_step_scorer, verifier_step_scorer

__all__ = ["REWARD_FUNCTIONS", "Completions", "ProcessRewardScorer", "RewardFunction", "RewardModelScorer", "Scores",
           "Step", "StepScorer", "WeightedRewards", "locate_steps", "prm_step_scorer", "register_reward_function",
           "verifier_step_scorer"]
