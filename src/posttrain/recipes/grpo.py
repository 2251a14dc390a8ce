"""Group relative policy optimisation (GRPO), with outcome or process supervision.

Each round samples G = sampling.samples_per_prompt completions for each of its prompts, scores them, and
trains on advantages measured against the other completions of the same prompt (grouped by prompt id):

    outcome:  A_i     = (r_i - mean_g r) / (std_g r + eps)       estimator grpo; grpo_batch_std: the batch std;
                                                                  dr_grpo: no division (Dr. GRPO); rloo, ...
    process:  r~_ij   = (r_ij - mean R_g) / (std R_g + eps)       R_g = every step reward of the group
              A_{i,t} = sum of gamma^(steps between) r~_ij over the steps j of completion i that end at or after
                        token t (advantage.gamma: 1 sums them all, 0 keeps the token's own step)
    ratio_t = exp(logp_t - old_logp_t)
    L_t     = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - clip_low, 1 + clip_high)) + beta * k3_t
    k3_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (KL to the reference; kl.coef = 0 loads none)
    loss    = aggregate(L): token-mean (DAPO), seq-mean-token-mean (GRPO), seq-mean-token-sum-norm (Dr. GRPO)

r is the weighted sum of the configured reward functions (`posttrain.rewards.functions`). Process
supervision scores every step with the task's step verifier or a process reward model
(`posttrain.rewards.steps`), maps each step's last character to its token, and by default adds the
outcome reward as a last step ending at the final token, so stopping early is not free.

The round itself (sample, score, pi_old, reference, advantages, epochs x micro-batches) is the shared RL
loop of `recipes.rl_loop`: GRPO is its case of one minibatch, `update.epochs` optimizer steps per round
(GRPO's num_iterations) and no critic. With one step per round, pi_old is the policy being trained, so
the ratio is exactly 1 at no extra forward; sampler and trainer logprobs are compared (logprob_mismatch,
~1e-7 on CPU fp32: the engine and the trainer compute one distribution).
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.algos import last_token_index
from posttrain.config import RunConfig, param, section
from posttrain.data.tasks.base import Task
from posttrain.errors import ConfigError
from posttrain.models.value import ActorCritic
from posttrain.recipes.rl import AdvantageConfig, RLConfig, SamplingConfig, check_rl_config
from posttrain.recipes.rl_loop import StepRewards, StepRewardsHook, train_rl
from posttrain.rewards.functions import Completions
from posttrain.rewards.steps import StepScorer, locate_steps, prm_step_scorer, verifier_step_scorer
from posttrain.rollout import Rollout
from posttrain.train.entry import stage_main
from posttrain.train.run_dir import RunResult


@dataclasses.dataclass(frozen=True)
class GRPOAdvantageConfig(AdvantageConfig):
    gamma: float = param(1.0, "Process supervision: the discount per later step in a token's advantage (1: the sum "
                              "over the steps ending at or after it, as in DeepSeekMath; 0: its own step's reward "
                              "only). Unused by outcome supervision.", ge=0, le=1)
    supervision: str = param("outcome", "outcome: one reward per completion; process: a score per reasoning step "
                                        "(advantages of the grpo_process estimator).", choices=("outcome", "process"))
    step_scorer: str = param("verifier", "Process supervision: the task's step verifier, or a process reward "
                                         "model (prm_path).", choices=("verifier", "prm"))
    prm_path: str | None = param(None, "Process reward model directory (from `posttrain rm prm`).")
    outcome_step: bool = param(True, "Process supervision: the outcome reward counts as one more step, ending at "
                                     "the completion's last token.")
    step_baseline: str = param("group", "Process supervision: what a step's reward is compared with. group: every "
                                        "step reward of the prompt's completions (DeepSeekMath); position: the "
                                        "same step of the prompt's other completions (by its label where the task "
                                        "reads one, \"b)\", else the j-th line), and the outcome "
                                        "with the outcome, for tasks whose steps correspond across completions "
                                        "(the built-in multistep: step j computes gold step j). A step no other "
                                        "completion has at its position gets 0.",
                               choices=("group", "position"))


@dataclasses.dataclass(frozen=True)
class GRPOConfig(RLConfig):
    run: RunConfig = section(lambda: RunConfig(name="grpo"), "Run directory, seed, logging.")
    sampling: SamplingConfig = section(lambda: SamplingConfig(samples_per_prompt=8),
                                       "How completions are sampled; train.batch_size counts completions.")
    advantage: GRPOAdvantageConfig = section(GRPOAdvantageConfig, "Outcome or process advantages.")


@stage_main(GRPOConfig)
def main(cfg: GRPOConfig) -> RunResult:
    check_config(cfg)
    title = f"GRPO ({cfg.advantage.supervision} supervision) on {cfg.data.source}"
    return train_rl(cfg, stage="grpo", title=title, build_model=lambda actor: ActorCritic(actor, values=False),
                    step_rewards=lambda task, tokenizer: process_rewards(cfg.advantage, task, tokenizer),
                    summary=lambda source: {"supervision": cfg.advantage.supervision})


def check_config(cfg: GRPOConfig) -> None:
    check_rl_config(cfg, "GRPO")
    if cfg.advantage.estimator == "gae":  # a user's estimator gets no values either
        raise ConfigError("GAE needs a critic, which GRPO does not train: use `posttrain ppo`, or a critic-free "
                          "estimator", field="advantage.estimator")
    if cfg.advantage.supervision == "process" and cfg.advantage.estimator != "grpo":
        raise ConfigError("process supervision normalises step rewards over the group (the grpo_process "
                          "estimator): leave advantage.estimator at grpo", field="advantage.estimator")
    if cfg.advantage.supervision == "process" and cfg.filter.enabled:
        raise ConfigError("dynamic sampling keeps groups by their final answers' success rate, while process "
                          "supervision also learns from a group whose answers all fail but whose steps differ "
                          "(those would be dropped): not supported together, set filter.enabled=false",
                          field="filter.enabled")
    if cfg.advantage.supervision == "process" and cfg.kl.coef > 0 and cfg.kl.placement == "reward":
        raise ConfigError("kl.placement=reward puts -beta * KL into the token rewards, which process supervision "
                          "does not read (its advantages come from the step rewards), so nothing would hold the "
                          "policy to the reference: use kl.placement=loss", field="kl.placement")


# ----------------------------------------------------------------------------------------------
# Process supervision: a reward for every reasoning step, at the token where the step ends.


def build_step_scorer(cfg: GRPOAdvantageConfig, task: Task | None) -> StepScorer:
    if cfg.step_scorer == "prm":
        if not cfg.prm_path:
            raise ConfigError("step_scorer=prm needs the process reward model's directory", field="advantage.prm_path")
        from posttrain.rewards import ProcessRewardScorer

        return prm_step_scorer(ProcessRewardScorer.from_pretrained(cfg.prm_path))
    if task is None:
        raise ConfigError("the step verifier comes from a built-in task: set reward.task (e.g. multistep)",
                          field="reward.task")
    try:
        return verifier_step_scorer(task)
    except ValueError as err:
        raise ConfigError(str(err), field="advantage.step_scorer") from None


def process_rewards(cfg: GRPOAdvantageConfig, task: Task | None,
                    tokenizer: PreTrainedTokenizerBase) -> StepRewardsHook | None:
    """The round's step-rewards hook (`rl_loop.StepRewardsHook`) for process supervision; None for outcome."""
    if cfg.supervision != "process":
        return None
    return ProcessRewards(build_step_scorer(cfg, task), tokenizer, cfg.outcome_step,
                          by_position=cfg.step_baseline == "position")


OUTCOME_POSITION = -1  # the outcome step's position: compared with the other completions' outcomes only


class ProcessRewards:
    """Scores every step of every completion and places each step's reward at the token where the step ends;
    with `outcome_step`, the completion's score is one more step, ending at its last token; `by_position`: each
    step's position (j for the j-th, OUTCOME_POSITION for the outcome) for a baseline per position."""

    def __init__(self, scorer: StepScorer, tokenizer: PreTrainedTokenizerBase, outcome_step: bool = True, *,
                 by_position: bool = False) -> None:
        self.scorer, self.tokenizer, self.outcome_step = scorer, tokenizer, outcome_step
        self.by_position = by_position

    def __call__(self, rollout: Rollout, completions: Completions, scores: torch.Tensor) -> StepRewards:
        steps = self.scorer(completions)
        last = last_token_index(rollout.response_mask).tolist()  # where the outcome reward lands, as in `rl_loop`
        rows = []
        for i, row in enumerate(steps):
            ids = rollout.completion_ids[i, :int(rollout.completion_lengths[i])].tolist()
            ends = locate_steps(self.tokenizer, ids, [s.char_end for s in row])
            pairs = [(s.score, end) for s, end in zip(row, ends, strict=True)]
            rows.append(pairs + [(float(scores[i]), last[i])] if self.outcome_step else pairs)
        width = max(1, max(len(r) for r in rows))
        step_rewards = torch.zeros(len(rows), width, dtype=torch.float64)
        step_ends = torch.zeros(len(rows), width, dtype=torch.long)
        step_mask = torch.zeros(len(rows), width, dtype=torch.bool)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        for i, pairs in enumerate(rows):
            for j, (score, end) in enumerate(pairs):
                step_rewards[i, j], step_ends[i, j], step_mask[i, j] = score, end, True
                # which step it is where the scorer read it (a labelled line: a repeated line must not shift every
                # later step onto another step's baseline), else its place
                known = steps[i][j].position if j < len(steps[i]) else None
                positions[i, j] = (OUTCOME_POSITION if self.outcome_step and j == len(pairs) - 1
                                   else known if known is not None else j)
        scored = [s.score for row in steps for s in row]
        metrics = {"step_score": sum(scored) / len(scored) if scored else 0.0, "steps_found": len(scored) / len(steps)}
        return StepRewards(step_rewards=step_rewards, step_mask=step_mask, step_ends=step_ends,
                           scores=[[s.score for s in row] for row in steps], metrics=metrics,
                           step_positions=positions if self.by_position else None)
