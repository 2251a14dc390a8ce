"""RLHF with PPO: actor, critic, reference and reward, GAE on a KL-penalised per-token reward.

Each round samples `update.rollout_batch_size` completions with the actor (the SFT model), scores them,
and trains on them for `update.epochs` passes of minibatches of `train.batch_size` completions — one
optimizer step per minibatch, so one round is epochs x rollout_batch_size / batch_size optimizer steps
(train.max_steps counts those):

    score_i  = r(prompt_i, completion_i) [- reward.missing_eos_penalty if cut by max_new_tokens]
    KL_t     = kl(logp_old_t, logp_ref_t)                   k1 = logp_old - logp_ref (default) or k3
    r_t      = -beta * KL_t + [t = last real token] * score_i    (never a pad, whatever the pad id)
    A_t, R_t = GAE(r, V_old, gamma, lambda);  R_t = A_t + V_old_t;  A whitened over the round's valid tokens
    ratio_t  = exp(logp_t - logp_old_t)
    L        = clipped surrogate(ratio, A, clip) + vf_coef * 0.5 max((V - R)^2, (V_clip - R)^2) - ent_coef * H

r is any weighted mix of reward functions (`posttrain.rewards.functions`): the reward model of
`posttrain rm` (`reward_model`), a task verifier (`correct`, `format`, ...), or a registered grader.
beta (kl.coef) is fixed or adapted towards a target KL (Ziegler et al. 2019). logp_old and V_old come
from one no-grad pass of the actor-critic over the rollout, on exactly the micro-batches the first epoch
trains on, so the first update of a round sees ratio = 1 and (at the start) KL = 0.

The round is the shared RL loop of `recipes.rl_loop`; what is PPO's own is the critic: a separate value
model (initialised from the policy's trunk or from the reward model) or a value head on the actor's trunk
(`models.value`). Or there is none: `advantage.estimator` = grpo, rloo, ... takes a critic-free baseline
from the algos registry, on the sequence reward score - beta * sum_t KL_t (the completions of one prompt,
sampling.samples_per_prompt of them, are each other's baseline), and the loss has no value term. Actor
and critic train as one module with one optimizer, so checkpoints hold both, with their moments; a
checkpoint taken between rounds resumes bitwise (train.save_every must be a multiple of a round's steps;
one taken inside a round, when a signal stops the run there, resumes with a fresh rollout).

Memory: no pass of actor and critic, with or without gradient, computes more than
`update.micro_batch_tokens` token positions (`rl_loop.split_by_tokens`): the activations saved for the
backward then stop growing with the rollout batch; every piece's loss is divided by its minibatch's
normaliser, so the gradient is the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from posttrain.config import RunConfig, param, section
from posttrain.errors import ConfigError
from posttrain.models.attention import packing_obstacle
from posttrain.models.io import adapter_base, check_model_dir, check_same_vocabulary
from posttrain.models.value import CRITIC_INITS, CRITIC_PREFIXES, ActorCritic, build_value_model
from posttrain.recipes.rl import CRITIC_FREE, AdvantageConfig, KLConfig, RLConfig, UpdateConfig, check_rl_config
from posttrain.recipes.rl_loop import train_rl
from posttrain.rewards.functions import WeightedRewards
from posttrain.train.entry import stage_main
from posttrain.train.run_dir import RunResult

CRITIC_KINDS = ("separate", "shared", "none")


@dataclasses.dataclass(frozen=True)
class CriticConfig:
    kind: str = param("separate", "separate: a value model of its own; shared: a value head on the actor's trunk "
                                  "(one forward, no second trunk); none: no critic (an estimator that reads no "
                                  "values; the registry's critic-free ones never get one).", choices=CRITIC_KINDS)
    init: str = param("policy", "A separate critic starts from the policy's trunk (zero head) or from the reward "
                                "model (trunk and head).", choices=CRITIC_INITS)
    path: str | None = param(None, "Checkpoint to initialise the critic from (None: model.path for init=policy, "
                                   "reward.model_path for init=reward_model).")
    lr: float | None = param(None, "Peak learning rate of the critic: the separate value model, or the value head "
                                   "on a shared trunk (None: optim.lr). A critic started from the policy has a "
                                   "zero head to fit, and at the policy's lr it explains none of the returns' "
                                   "variance in a short run.", gt=0)


@dataclasses.dataclass(frozen=True)
class PPOConfig(RLConfig):
    run: RunConfig = section(lambda: RunConfig(name="ppo"), "Run directory, seed, logging.")
    kl: KLConfig = section(lambda: KLConfig(coef=0.05, kind="k1", placement="reward"),
                           "The KL to the reference policy, as a per-token reward (RLHF).")
    advantage: AdvantageConfig = section(lambda: AdvantageConfig(estimator="gae", whiten=True),
                                         "GAE on the critic's values, or a critic-free estimator.")
    update: UpdateConfig = section(lambda: UpdateConfig(micro_batch_tokens=1024),
                                   "How a round trains: epochs, minibatches, micro-batches.")
    critic: CriticConfig = section(CriticConfig, "The value model.")


@stage_main(PPOConfig)
def main(cfg: PPOConfig) -> RunResult:
    return train_ppo(cfg, stage="ppo", title=f"PPO on {cfg.data.source}")


def train_ppo(cfg: Any, *, stage: str, title: str, rewards: WeightedRewards | None = None) -> RunResult:
    """PPO for any config with PPOConfig's sections; `rewards` replaces the ones built from cfg.reward."""
    check_config(cfg, stage.upper())
    return train_rl(cfg, stage=stage, title=title, rewards=rewards,
                    build_model=lambda actor: ActorCritic(actor, build_critic(cfg), values=has_critic(cfg)),
                    summary=lambda source: {"critic": cfg.critic.kind if has_critic(cfg) else "none"},
                    lr_by_prefix=critic_lr(cfg))


def check_config(cfg: Any, stage: str = "PPO") -> None:
    check_rl_config(cfg, stage)
    if cfg.advantage.estimator == "gae" and not has_critic(cfg):
        raise ConfigError("advantage.estimator=gae reads a critic's values: set critic.kind to separate or shared",
                          field="critic.kind")
    if has_critic(cfg) and cfg.critic.kind == "separate" and cfg.critic.init == "reward_model" and not (
            cfg.critic.path or cfg.reward.model_path):
        raise ConfigError("critic.init=reward_model needs the reward model's directory: set reward.model_path "
                          "or critic.path", field="critic.path")
    if has_critic(cfg) and cfg.critic.kind == "shared" and (cfg.critic.path or cfg.critic.init != "policy"):
        # a value head on the actor's own trunk starts at zero: nothing to initialise it from
        raise ConfigError("critic.kind=shared puts a zero-initialised value head on the policy's trunk: critic.init"
                          "=reward_model and critic.path are for critic.kind=separate",
                          field="critic.path" if cfg.critic.path else "critic.init")


def has_critic(cfg: Any) -> bool:
    """Whether the trained module has values: not for the registry's critic-free estimators or critic.kind=none."""
    return cfg.advantage.estimator not in CRITIC_FREE and cfg.critic.kind != "none"


def critic_lr(cfg: Any) -> dict[str, float]:
    """The critic's peak lr (critic.lr, else optim.lr) by the prefix of its parameters' names in ActorCritic: in
    optimizer groups of their own even at the policy's lr, so that a run resumes with another critic.lr."""
    if not has_critic(cfg):
        return {}
    return {prefix: cfg.critic.lr or cfg.optim.lr for prefix in CRITIC_PREFIXES}


def build_critic(cfg: Any) -> torch.nn.Module | None:
    """The separate value model (None for a value head on the actor's trunk, or no critic)."""
    if not has_critic(cfg) or cfg.critic.kind != "separate":
        return None
    default = cfg.model.path if cfg.critic.init == "policy" else cfg.reward.model_path
    path = cfg.critic.path or default
    field = "critic.path" if cfg.critic.path else "model.path" if cfg.critic.init == "policy" else "reward.model_path"
    if adapter_base(path, field) is None:  # a model directory (an adapter's base is checked with it): errors name
        check_model_dir(path, field, trust_remote_code=cfg.model.trust_remote_code)  # the setting that gave it
    if path != cfg.model.path:
        check_same_vocabulary(cfg.model.path, path, field, trust_remote_code=cfg.model.trust_remote_code)
    critic = build_value_model(path, cfg.critic.init, dtype=cfg.model.dtype, field=field,
                               trust_remote_code=cfg.model.trust_remote_code, disable_dropout=cfg.model.drops_dropout())
    obstacle = packing_obstacle(critic) if cfg.update.padding_free else None
    if obstacle:  # before the first round is sampled, not at its first forward
        raise ConfigError(f"the critic ({path}) cannot take padding-free batches: {obstacle}; set "
                          "update.padding_free=false", field="update.padding_free")
    return critic
