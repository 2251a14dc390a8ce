"""Reinforcement fine-tuning (RFT): PPO against graders that give partial credit in [0, 1].

The policy is optimised with the PPO clipped surrogate and a critic trained under the clipped value loss

    L_V = 0.5 * E[max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)]        (`algos.value_loss`)

on the shared RL round (rollout -> per-token reward -> GAE -> epochs x minibatches, `recipes.rl_loop`) as
the PPO recipe runs it (`recipes.ppo.train_ppo`); the score at each completion's last token comes from the
grader file named by `reward.grader` (the `grader` reward function: string_check, text_similarity, python,
score_model, multi, teacher; see `posttrain.rewards.graders`), optionally mixed with task verifiers or a
reward model.

Options of that loop: `advantage.estimator=grpo` (or rloo, dr_grpo, ...) replaces critic and GAE by a group
baseline over the sampling.samples_per_prompt completions of each prompt (no critic is built or trained);
`loss.sft_coef=alpha` blends in an SFT term on the reference answers, loss = L_PPO + alpha * L_SFT with
L_SFT the token-mean NLL of each minibatch's prompts' gold answers rendered as the assistant turn.

All roads lead to likelihood. SFT, rejection sampling, offline RFT and DPO all maximise a weighted
log-likelihood of responses y to prompts x, and differ only in where the responses and weights come from:

    SFT                 sum_i 1 * log p(y_i | x_i)                        demonstrations, weight 1
    rejection sampling  sum_i 1[grade(y_i) >= t] * log p(y_i | x_i)        own samples, 0/1 from a grader
    offline RFT         sum_i grade(y_i) * log p(y_i | x_i)                fixed labelled set, partial credit
    DPO                 sum log sigmoid(beta (log p(y_w)/p_ref(y_w) - log p(y_l)/p_ref(y_l)))
                        whose gradient is beta * sigma(-margin) * (grad log p(y_w) - grad log p(y_l)):
                        a likelihood gradient with weight +w on the chosen and -w on the rejected response
    online RFT / PPO    sum_t A_t * ratio_t * grad log p(y_t | ...): the weight is the advantage, the
                        responses are fresh samples, and the clip keeps the weights' policy close

In this code base `algos.sft_loss(..., weights=)` is that one objective, and `recipes.sft.step_source(...,
weights=)` trains it: the rejection recipe feeds it 0/1 weights over its own samples, and offline RFT
(`mode=offline`, `recipes.rft_offline`) the graders' scores of a fixed labelled set: every response of
the data set (for a built-in task, each problem's correct completion and its plausible wrong ones) is
scored once, and the responses train with their scores as weights — 0/1 scores give SFT on the responses
scored 1 exactly, partial credit weights the near misses in between.
"""

from __future__ import annotations

import dataclasses

from posttrain.config import RunConfig, param, section
from posttrain.recipes import rft_offline
from posttrain.recipes.ppo import PPOConfig, train_ppo
from posttrain.recipes.rl import RLRewardConfig
from posttrain.train.entry import stage_main
from posttrain.train.run_dir import RunResult


@dataclasses.dataclass(frozen=True)
class RFTConfig(PPOConfig):
    run: RunConfig = section(lambda: RunConfig(name="rft"), "Run directory, seed, logging.")
    reward: RLRewardConfig = section(lambda: RLRewardConfig(functions={"grader": 1.0}, grader="arith-partial"),
                                   "Graders (reward.grader) and any other reward functions, scored at the last "
                                   "token.")
    mode: str = param("online", "online: PPO on fresh samples; offline: reward-weighted likelihood on the data "
                                "set's own responses, scored once by the graders (see recipes.rft_offline; "
                                "sampling, critic, kl, advantage, loss and update are unused).",
                       choices=("online", "offline"))


@stage_main(RFTConfig)
def main(cfg: RFTConfig) -> RunResult:
    if cfg.mode == "offline":
        return rft_offline.train_offline(cfg)
    graders = f" (grader {cfg.reward.grader})" if cfg.reward.grader else ""
    return train_ppo(cfg, stage="rft", title=f"RFT: PPO with graders{graders} on {cfg.data.source}")
