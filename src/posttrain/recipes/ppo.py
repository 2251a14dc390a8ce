"""RLHF with PPO: actor, critic, reference and reward, GAE on a KL-penalised per-token reward.

Each PPO iteration samples `ppo.rollout_batch_size` completions with the actor (the SFT model),
scores them, and trains on them for `ppo.epochs` passes of minibatches of `train.batch_size`
completions — one optimizer step per minibatch, so one iteration is
epochs x rollout_batch_size / batch_size optimizer steps (train.max_steps counts those):

    score_i  = r(prompt_i, completion_i) [- missing_eos_penalty if cut by max_new_tokens]
    KL_t     = kl(logp_old_t, logp_ref_t)                   k1 = logp_old - logp_ref (default) or k3
    r_t      = -beta * KL_t + [t = last real token] * score_i    (never a pad, whatever the pad id)
    A_t, R_t = GAE(r, V_old, gamma, lambda);  R_t = A_t + V_old_t;  A whitened over the batch's valid tokens
    ratio_t  = exp(logp_t - logp_old_t)
    L        = clipped surrogate(ratio, A, clip) + vf_coef * 0.5 max((V - R)^2, (V_clip - R)^2) - ent_coef * H

r is any weighted mix of reward functions (`posttrain.rewards.functions`): the reward model of
`posttrain rm` (`reward_model`), a task verifier (`correct`, `format`, ...), or a registered grader.
beta is fixed or adapted towards a target KL (Ziegler et al. 2019). logp_old and V_old come from
one no-grad pass of the actor-critic over the rollout, on exactly the micro-batches the first
epoch trains on, so the first update of an iteration sees ratio = 1 and (at the start) KL = 0.

The critic is a separate value model (initialised from the policy's trunk or from the reward model)
or a value head on the actor's trunk (`models.value`). Or there is none: `ppo.advantage` = grpo, rloo,
... takes a critic-free baseline from the algos registry, on the sequence reward score - beta * sum_t KL_t
(the completions of one prompt, sampling.samples_per_prompt of them, are each other's baseline), and the
loss has no value term. Actor and critic train as one module with one
optimizer, so checkpoints hold both, with their moments; a checkpoint taken between iterations
resumes bitwise (train.save_every must be a multiple of an iteration's steps; one taken inside an
iteration, when a signal stops the run there, resumes with a fresh rollout).

Memory: no pass of actor and critic, with or without gradient, computes more than
`ppo.micro_batch_tokens` token positions (`split_by_tokens`): the activations saved for the backward
(about 0.35 MB per token per model for the 26M-parameter benchmark model, fp32) then stop growing with
the rollout batch; every piece's loss is divided by its minibatch's normaliser, so the gradient is the same.

The rollout -> per-token rewards -> GAE -> epochs x minibatches core (`PPOStepSource`,
`ppo_loss_fn`, `train_ppo`) takes its reward as a `WeightedRewards`, so other recipes reuse it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain.algos import (
    AGG_MODES,
    KL_KINDS,
    POLICY_LOSSES,
    AdaptiveKLController,
    AdvantageInputs,
    Advantages,
    FixedKLController,
    aggregate,
    gae,
    get_advantage_estimator,
    get_policy_loss,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    sft_loss,
    value_loss,
)
from posttrain.config import ModelConfig, OptimConfig, RunConfig, param, section
from posttrain.data.collate import capped_rows
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import Prepared, prepare_data
from posttrain.data.tasks.base import Task
from posttrain.errors import ConfigError
from posttrain.eval.accuracy import EvalConfig, accuracy_evaluator, heldout_accuracy
from posttrain.eval.report import write_training_report
from posttrain.models import count_parameters, load_tokenizer_and_model
from posttrain.models.adapters import AdapterConfig, apply_adapter, save_trained
from posttrain.models.heads import floating_dtype
from posttrain.models.reward import last_token_index
from posttrain.models.value import CRITIC_INITS, CRITIC_KINDS, ActorCritic, build_value_model
from posttrain.recipes.rl import (
    GoldAnswers,
    PromptStream,
    RewardConfig,
    RolloutSampling,
    accuracy_summary,
    adapter_reference,
    build_reference,
    build_rewards,
    check_reward_functions,
    completions_of,
    padding_free_capacity_param,
    resolve_task,
    reward_metrics,
    sample_record,
)
from posttrain.rewards.functions import WeightedRewards
from posttrain.rollout import Rollout, RolloutEngine, make_engine
from posttrain.rollout.recompute import (
    completion_logprobs,
    pack_rollout,
    packed_completion_logprobs,
    policy_forward,
)
from posttrain.run import RunResult, prepare_run_dir
from posttrain.train.engine import StepBatch, TrainConfig, Trainer
from posttrain.train.forward import response_logprobs
from posttrain.train.metrics import append_jsonl
from posttrain.train.reference import Reference
from posttrain.train.seed import seed_everything, set_threads

KL_CONTROLLERS = ("fixed", "adaptive")
# Critic-free baselines from the algos registry (the sequence reward: the score minus beta * the summed KL);
# the group ones compare the sampling.samples_per_prompt completions of a prompt with each other.
CRITIC_FREE = ("grpo", "grpo_batch_std", "dr_grpo", "rloo", "reinforce_baseline")
GROUP_BASELINES = ("grpo", "grpo_batch_std", "dr_grpo", "rloo")


@dataclasses.dataclass(frozen=True)
class SamplingConfig(RolloutSampling):
    samples_per_prompt: int = param(1, "Completions sampled per prompt.", ge=1)


@dataclasses.dataclass(frozen=True)
class CriticConfig:
    kind: str = param("separate", "separate: a value model of its own; shared: a value head on the actor's trunk "
                                  "(one forward, no second trunk).", choices=CRITIC_KINDS)
    init: str = param("policy", "A separate critic starts from the policy's trunk (zero head) or from the reward "
                                "model (trunk and head).", choices=CRITIC_INITS)
    path: str | None = param(None, "Checkpoint to initialise the critic from (None: model.path for init=policy, "
                                   "reward.model_path for init=reward_model).")


@dataclasses.dataclass(frozen=True)
class PPOAlgoConfig:
    rollout_batch_size: int = param(64, "Completions sampled per PPO iteration (a multiple of train.batch_size, "
                                        "the minibatch).", ge=1)
    epochs: int = param(1, "Passes over each rollout batch (each a fresh shuffle into minibatches).", ge=1)
    gamma: float = param(1.0, "GAE discount.", ge=0, le=1)
    lam: float = param(0.95, "GAE lambda (0: one-step TD error; 1: Monte-Carlo return minus V).", ge=0, le=1)
    advantage: str = param("gae", "gae: a critic and GAE. Critic-free (no critic is built or trained): grpo, "
                                  "grpo_batch_std, dr_grpo, rloo (group baselines over the "
                                  "sampling.samples_per_prompt completions of each prompt) or reinforce_baseline "
                                  "(the batch mean), on score - beta * summed KL.", choices=("gae", *CRITIC_FREE))
    whiten_advantages: bool = param(True, "Normalise GAE advantages over the valid tokens of the rollout batch "
                                          "(critic-free ones are used as the estimator gives them).")
    policy_loss: str = param("ppo", "Policy loss from the algos registry.", choices=tuple(POLICY_LOSSES))
    agg: str = param("token-mean", "Loss aggregation over the minibatch.", choices=AGG_MODES)
    clip: float = param(0.2, "Policy ratio clip range.", ge=0)
    value_clip: float | None = param(0.2, "Value clip range around the rollout's values (None: unclipped).", ge=0)
    vf_coef: float = param(0.1, "Weight of the value loss.", ge=0)
    entropy_coef: float = param(0.0, "Weight of the entropy bonus (0: off).", ge=0)
    kl_coef: float = param(0.05, "beta: weight of the per-token KL penalty in the reward (0: no reference "
                                 "model is loaded).", ge=0)
    kl_kind: str = param("k1", "KL estimator in the reward.", choices=KL_KINDS)
    kl_controller: str = param("fixed", "Keep beta fixed, or adapt it towards kl_target.", choices=KL_CONTROLLERS)
    kl_target: float = param(6.0, "Adaptive controller: target KL per completion (summed over its tokens).", gt=0)
    kl_horizon: float = param(10_000, "Adaptive controller: horizon in completions (how slowly beta moves).", gt=0)
    sft_coef: float = param(0.0, "alpha: loss = L_PPO + alpha * L_SFT, L_SFT the token-mean NLL of the gold answers "
                                 "(the data's `answer`, as the assistant turn) of each minibatch's prompts (0: off).",
                            ge=0)
    missing_eos_penalty: float | None = param(None, "Subtracted from the score of completions cut by "
                                                    "max_new_tokens (None: no penalty).", ge=0)
    padding_free: bool = param(True, "Actor and critic forwards over the real tokens only (packed rows, "
                                     "block-diagonal mask) instead of the rollout's padded layout: the same "
                                     "logprobs and values, less compute.")
    padding_free_capacity: int = padding_free_capacity_param()
    micro_batch_tokens: int | None = param(1024, "Each forward/backward pass (and no-grad scoring pass) of actor "
                                                 "and critic computes at most this many token positions (packed "
                                                 "rows x their width; padded layout: rows x their longest prompt + "
                                                 "completion): a micro-batch of train.micro_batch_size rows is cut "
                                                 "further, with the same gradient (every piece is divided by the "
                                                 "minibatch's normaliser) and a peak of activation memory that no "
                                                 "longer grows with the minibatch (None: train.micro_batch_size "
                                                 "alone).", ge=1)


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    run: RunConfig = section(lambda: RunConfig(name="ppo"), "Run directory, seed, logging.")
    model: ModelConfig = section(lambda: ModelConfig(path="runs/sft/final"), "The actor (the SFT model).")
    adapter: AdapterConfig = section(AdapterConfig, "Full fine-tuning or LoRA for the actor (with LoRA, the "
                                                    "adapter-disabled actor is the reference).")
    data: DataConfig = section(lambda: DataConfig(source="arith", size=20_000, max_length=256),
                               "Prompts with gold answers (verifiable rows).")
    optim: OptimConfig = section(lambda: OptimConfig(lr=1e-5, schedule="constant"),
                                 "Optimizer of actor and critic together.")
    train: TrainConfig = section(lambda: TrainConfig(max_steps=100, batch_size=64, micro_batch_size=64),
                                 "max_steps counts minibatch updates; batch_size (the minibatch) and "
                                 "micro_batch_size count completions.")
    sampling: SamplingConfig = section(SamplingConfig, "How completions are sampled.")
    reward: RewardConfig = section(RewardConfig, "What a completion is worth (the score at its last token).")
    critic: CriticConfig = section(CriticConfig, "The value model.")
    ppo: PPOAlgoConfig = section(PPOAlgoConfig, "GAE, the clipped losses and the KL penalty.")
    eval: EvalConfig = section(EvalConfig, "Held-out exact-match evaluation.")
    eval_before: bool = param(True, "Also evaluate the starting model, to report the gain.")


def main(cfg: PPOConfig) -> RunResult:
    return train_ppo(cfg, stage="ppo", title=f"PPO on {cfg.data.source}")


def train_ppo(cfg: Any, *, stage: str, title: str, rewards: WeightedRewards | None = None) -> RunResult:
    """The PPO loop for any config with PPOConfig's sections; `rewards` replaces the one built from cfg.reward."""
    set_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    check_config(cfg)
    tokenizer, actor = load_tokenizer_and_model(cfg.model)
    prepared = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS["ppo"], mask_dtype=actor.dtype)
    task = resolve_task(cfg)
    rewards = rewards if rewards is not None else build_rewards(cfg.reward, task)
    run_dir = prepare_run_dir(cfg.run, cfg, stage=stage)

    before = heldout_accuracy(actor, tokenizer, cfg.data, cfg.eval) if cfg.eval_before else None
    reference = build_reference(cfg.ppo.kl_coef, cfg.adapter, actor)
    actor = apply_adapter(actor, cfg.adapter)
    reference = adapter_reference(reference, cfg.ppo.kl_coef, actor)
    critic_free = cfg.ppo.advantage in CRITIC_FREE
    model = ActorCritic(actor, None if critic_free else build_critic(cfg), values=not critic_free)
    gold = GoldAnswers(tokenizer, cfg.data) if cfg.ppo.sft_coef > 0 else None
    source = PPOStepSource(cfg.ppo, cfg.sampling, cfg.train, cfg.run.seed, prepared,
                           make_engine(cfg.sampling.engine, actor, tokenizer), model, rewards, task=task,
                           reference=reference, gold=gold, samples=run_dir.samples)
    trainer = Trainer(stage=stage, cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim, run_dir=run_dir,
                      model=model)
    result = trainer.fit(source, ppo_loss_fn(cfg.ppo, cfg.sampling.max_new_tokens),
                         accuracy_evaluator(actor, tokenizer, cfg.data, cfg.eval, run_dir.samples),
                         progress_keys=("score", "kl", "accuracy", "eval_accuracy"))
    if result.interrupted:
        return RunResult(run_dir=run_dir.path, final_dir=None, summary={"interrupted_at_step": result.step})

    final_dir = save_trained(actor, tokenizer, run_dir.final, cfg.adapter)
    last = result.last
    summary = {"advantage": cfg.ppo.advantage, "critic": "none" if critic_free else cfg.critic.kind,
               "trainable_parameters": count_parameters(model, trainable_only=True),
               "steps": result.step, "iterations": source.prompts.rounds, "trained_tokens": result.tokens,
               "seconds": result.seconds,
               **{k: last.get(k) for k in ("score", "reward", "kl", "beta", "value_explained_variance",
                                           "entropy", "completion_length")},
               **accuracy_summary(before, last, cfg.eval)}
    write_training_report(run_dir, title, summary)
    return RunResult(run_dir=run_dir.path, final_dir=final_dir, summary=summary)


def check_config(cfg: Any) -> None:
    if not cfg.model.path:
        raise ConfigError("PPO trains an existing model: set model.path (e.g. runs/sft/final)", field="model.path")
    if cfg.ppo.rollout_batch_size % cfg.train.batch_size:
        raise ConfigError(f"ppo.rollout_batch_size ({cfg.ppo.rollout_batch_size}) must be a multiple of "
                          f"train.batch_size ({cfg.train.batch_size}, the minibatch)", field="ppo.rollout_batch_size")
    iteration = cfg.ppo.epochs * cfg.ppo.rollout_batch_size // cfg.train.batch_size
    if cfg.train.save_every % iteration:
        # A checkpoint holds no rollout: one taken inside an iteration would resume with a fresh rollout,
        # a different run from the one that went on.
        raise ConfigError(f"train.save_every ({cfg.train.save_every}) must be a multiple of the optimizer steps "
                          f"of one PPO iteration, ppo.epochs x ppo.rollout_batch_size / train.batch_size = "
                          f"{cfg.ppo.epochs} x {cfg.ppo.rollout_batch_size} / {cfg.train.batch_size} = {iteration} "
                          f"(or 0), so that checkpoints fall between iterations", field="train.save_every")
    if cfg.ppo.rollout_batch_size % cfg.sampling.samples_per_prompt:
        raise ConfigError(f"ppo.rollout_batch_size ({cfg.ppo.rollout_batch_size}) must be a multiple of "
                          f"sampling.samples_per_prompt ({cfg.sampling.samples_per_prompt})",
                          field="ppo.rollout_batch_size")
    if cfg.ppo.advantage in GROUP_BASELINES and cfg.sampling.samples_per_prompt < 2:
        raise ConfigError(f"ppo.advantage={cfg.ppo.advantage} compares the completions of a prompt with each "
                          "other: set sampling.samples_per_prompt >= 2", field="sampling.samples_per_prompt")
    if cfg.adapter.method == "prefix":
        raise ConfigError("PPO trains full weights or LoRA (prefix-tuning cannot sample exactly)",
                          field="adapter.method")
    if cfg.critic.kind == "separate" and cfg.critic.init == "reward_model" and not (cfg.critic.path
                                                                                   or cfg.reward.model_path):
        raise ConfigError("critic.init=reward_model needs the reward model's directory: set reward.model_path "
                          "or critic.path", field="critic.path")
    check_reward_functions(cfg.reward)


def build_critic(cfg: Any) -> torch.nn.Module | None:
    """The separate value model (None for a value head on the actor's trunk)."""
    if cfg.critic.kind == "shared":
        return None
    default = cfg.model.path if cfg.critic.init == "policy" else cfg.reward.model_path
    return build_value_model(cfg.critic.path or default, cfg.critic.init, dtype=cfg.model.dtype,
                             trust_remote_code=cfg.model.trust_remote_code)


def kl_controller(cfg: PPOAlgoConfig) -> FixedKLController | AdaptiveKLController:
    if cfg.kl_controller == "adaptive":
        return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


# ----------------------------------------------------------------------------------------------
# The PPO math on a rollout batch (pure functions; another recipe can call them).


def score_at_last_token(scores: Tensor, mask: Tensor) -> Tensor:
    """[B, T]: each row's score at its last real token (the last 1 of `mask`, padded on either side), 0
    elsewhere. Read from the mask, never from token ids: a pad that equals EOS cannot move it."""
    out = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rows = torch.arange(mask.shape[0], device=mask.device)
    out[rows, last_token_index(mask)] = scores
    return out * mask.to(scores.dtype)


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """r_t = -beta * KL_t on every completion token plus the score at the last real one. Shapes: scores [B];
    kl, mask [B, T] -> [B, T] (0 where the mask is 0)."""
    penalty = -beta * kl.to(scores.dtype) * mask.to(scores.dtype)
    return penalty + score_at_last_token(scores, mask)


def ppo_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float,
                   whiten: bool) -> Advantages:
    """GAE advantages (whitened over the valid tokens on request) and the value targets R = A + V (of the
    advantages before whitening). float64 inside; shapes [B, T]."""
    advantages, returns = gae(rewards.double(), values.double(), mask, gamma, lam)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return Advantages(advantages=advantages.to(values.dtype), returns=returns.to(values.dtype))


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the valid tokens (1: the critic predicts the returns; <= 0: no better
    than a constant)."""
    variance = masked_var(returns, mask).item()
    return 1.0 - masked_var(returns - values, mask).item() / variance if variance > 0 else float("nan")


def rollout_forward(model: ActorCritic, rollout: Rollout, entropy_grad: bool = False,
                    padding_free_capacity: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The actor's logprobs, its entropy and the critic's values [B, T] of a rollout's completion tokens
    (0 outside the response mask; None without a critic): value t is that of the prefix before
    completion token t. With `padding_free_capacity`, over the rollout's real tokens packed into rows of
    about that many tokens (`pack_rollout`): the same numbers, without computing padding."""
    if padding_free_capacity is not None:
        packed = pack_rollout(rollout, padding_free_capacity, mask_dtype=floating_dtype(model))
        logits, values = model(packed.input_ids, packed.attention_mask, packed.position_ids, keep=packed.sources)
        logprobs, entropy = packed_completion_logprobs(logits, rollout, packed, entropy_grad=entropy_grad)
        return logprobs, entropy, None if values is None else packed.scatter(values)
    width = rollout.completion_ids.shape[1]
    logits, values = model(rollout.input_ids, rollout.attention_mask, rollout.position_ids, keep=width + 1)
    logprobs, entropy = completion_logprobs(logits, rollout, entropy_grad=entropy_grad)
    return logprobs, entropy, None if values is None else values[:, :-1] * rollout.response_mask


def split_by_tokens(rows: Tensor, rollout: Rollout, budget: int | None, capacity: int | None) -> list[Tensor]:
    """`rows` (longest first) cut into micro-batches whose forward computes at most `budget` positions.

    Padding-free (`capacity` as `pack_rollout`'s): the rows' samples are packed as the forward packs them,
    and a micro-batch takes consecutive packed rows while its forward's own packing (rows x width) fits,
    so cutting adds next to no row padding. Padded (capacity None): consecutive rows while their count x
    (longest prompt + longest completion) fits (the layout of `Rollout.select`). A packed row or sample over
    the budget goes alone; budget None keeps [rows]. Rows keep their order inside a micro-batch.
    """
    if budget is None:
        return [rows]
    prompts = rollout.prompt_mask[rows].sum(1).tolist()
    completions = rollout.response_mask[rows].sum(1).tolist()
    lengths = [p + c for p, c in zip(prompts, completions, strict=True)]
    if capacity is None:
        units = [[i] for i in range(len(rows))]

        def cost(samples: list[int]) -> int:
            return len(samples) * (max(prompts[i] for i in samples) + max(completions[i] for i in samples))
    else:
        units = capped_rows(lengths, capacity)

        def cost(samples: list[int]) -> int:
            sizes = [lengths[i] for i in samples]
            packed = capped_rows(sizes, capacity)
            return len(packed) * max(sum(sizes[i] for i in row) for row in packed)
    pieces: list[list[int]] = [[]]
    for unit in units:
        if pieces[-1] and cost(sorted(pieces[-1] + unit)) > budget:
            pieces.append([])
        pieces[-1].extend(unit)
    return [rows[sorted(piece)] for piece in pieces]


def packing(cfg: PPOAlgoConfig) -> int | None:
    """`rollout_forward`'s padding_free_capacity: None for the padded layout."""
    return cfg.padding_free_capacity if cfg.padding_free else None


# ----------------------------------------------------------------------------------------------
# Rollouts, rewards and advantages: the step source.


@dataclasses.dataclass
class PPOBatch:
    """One iteration's rollout and what was computed from it, all [B, T] but `scores` [B] (for inspection);
    `rows` are the round's prompt rows (rollout row i completes rows[prompt_index[i]])."""

    rows: list[dict[str, Any]]
    rollout: Rollout
    scores: Tensor
    old_logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    kl: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor
    beta: float


class PPOStepSource:
    """Samples a rollout batch, scores it, computes per-token rewards and GAE, and serves its minibatches.

    An iteration yields epochs x (rollout_batch_size / train.batch_size) optimizer steps. Rows of a
    minibatch are ordered by length into micro-batches of train.micro_batch_size rows and at most
    ppo.micro_batch_tokens tokens (the loss is divided by the minibatch's normaliser, so the grouping
    changes the compute and the memory, not the gradient). With `gold`, a
    micro-batch also carries the gold answers of its prompts (each prompt once per minibatch) and the
    minibatch's gold-token count, for the SFT term.
    """

    def __init__(self, algo: PPOAlgoConfig, sampling: SamplingConfig, train: TrainConfig, seed: int,
                 prepared: Prepared, engine: RolloutEngine, model: ActorCritic, rewards: WeightedRewards, *,
                 task: Task | None = None, reference: Reference | None = None, gold: GoldAnswers | None = None,
                 samples: Path | None = None) -> None:
        self.algo, self.train, self.seed = algo, train, seed
        self.engine, self.model, self.rewards, self.task, self.reference, self.gold, self.samples = (
            engine, model, rewards, task, reference, gold, samples)
        self.prompts = PromptStream(prepared.dataset, algo.rollout_batch_size // sampling.samples_per_prompt, seed)
        self.params = sampling.params(sampling.samples_per_prompt)
        self.kl = kl_controller(algo)
        self.steps = 0
        self.queue: list[StepBatch] = []
        self.last: PPOBatch | None = None

    def next_step(self) -> StepBatch:
        if not self.queue:
            self.queue = self.generate()
        self.steps += 1
        return self.queue.pop(0)

    def state_dict(self) -> dict[str, Any]:
        return {**self.prompts.state_dict(), "steps": self.steps, "kl": self.kl.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict(state)
        self.kl.load_state_dict(state["kl"])
        self.steps, self.queue = state["steps"], []

    def generate(self) -> list[StepBatch]:
        """One iteration: sample, score, evaluate logprobs and values, rewards, GAE; cut into minibatches."""
        start = time.perf_counter()
        rows, rollout = self.prompts.sample(self.engine, self.params)
        generation_s = time.perf_counter() - start
        completions = completions_of(rollout, rows)
        if self.gold is not None:
            self.gold.prepare(rows)
        scores = self.rewards(completions)
        score = scores.total.clone()
        if self.algo.missing_eos_penalty is not None:
            score -= self.algo.missing_eos_penalty * rollout.truncated.to(score.dtype)
        schedule = self._schedule(rollout)
        first_epoch = [micro for minibatch in schedule[0] for micro in minibatch]
        old_logprobs, values = self._evaluate(rollout, first_epoch)
        mask = rollout.response_mask.float()
        ref_logprobs = self._reference_logprobs(rollout, first_epoch) if self.reference is not None else old_logprobs
        kl = kl_penalty(old_logprobs, ref_logprobs, self.algo.kl_kind) * mask
        beta = self.kl.beta
        rewards = token_rewards(score, kl, mask, beta)
        if self.model.has_values:
            advantages, returns = ppo_advantages(rewards, values, mask, self.algo.gamma, self.algo.lam,
                                                 self.algo.whiten_advantages)
            raw_advantages = returns - values
            value_metrics = {"returns": masked_mean(returns, mask).item(), "values": masked_mean(values, mask).item(),
                             "value_explained_variance": explained_variance(values, returns, mask)}
        else:  # critic-free: the estimator reads the per-sequence sum of r_t, i.e. score - beta * summed KL
            inputs = AdvantageInputs(rewards=rewards, response_mask=mask, group_ids=rollout.prompt_index)
            advantages, returns = get_advantage_estimator(self.algo.advantage)(inputs, gamma=1.0, lam=1.0)
            raw_advantages, value_metrics = advantages, {}
        self.last = PPOBatch(rows, rollout, score, old_logprobs, ref_logprobs, values, kl, rewards, advantages, returns,
                             beta)
        sequence_kl = kl.sum(dim=1)
        self.kl.update(sequence_kl.mean().item(), len(score))
        metrics = {**reward_metrics(rollout, completions, scores, self.task),
                   "score": score.mean().item(), "kl": sequence_kl.mean().item(), "beta": beta,
                   "non_score_reward": (-beta * sequence_kl).mean().item(),
                   "advantages": masked_mean(raw_advantages, mask).item(),
                   "advantages_std": masked_var(raw_advantages, mask).sqrt().item(), **value_metrics,
                   "logprob_mismatch": masked_mean((rollout.logprobs - old_logprobs).abs(), mask).item(),
                   "generation_s": generation_s}
        self._write_samples(rollout, completions, scores, score, sequence_kl)
        metrics["scoring_s"] = time.perf_counter() - start - generation_s
        return self._step_batches(schedule, metrics)

    def _schedule(self, rollout: Rollout) -> list[list[list[Tensor]]]:
        """epochs -> minibatches -> micro-batches (row indices): a seeded shuffle per epoch, rows of a
        minibatch ordered by length (longest first) so each micro-batch pads to its own longest row."""
        size, lengths = rollout.response_mask.shape[0], rollout.prompt_mask.sum(1) + rollout.response_mask.sum(1)
        schedule = []
        for epoch in range(self.algo.epochs):
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.prompts.rounds) * 1_009 + epoch)
            minibatches = []
            for rows in torch.randperm(size, generator=generator).split(self.train.batch_size):
                rows = rows[torch.sort(lengths[rows], descending=True, stable=True).indices]
                minibatches.append([piece for micro in rows.split(self.train.micro_batch_size)
                                    for piece in split_by_tokens(micro, rollout, self.algo.micro_batch_tokens,
                                                                 packing(self.algo))])
            schedule.append(minibatches)
        return schedule

    @torch.no_grad()
    def _evaluate(self, rollout: Rollout, micro_batches: list[Tensor]) -> tuple[Tensor, Tensor]:
        """pi_old's logprobs and V_old of every row (0 without a critic), computed on the micro-batches the
        first epoch trains on."""
        dtype = next(self.model.parameters()).dtype
        logprobs, values = (torch.zeros(rollout.logprobs.shape, dtype=dtype) for _ in range(2))
        was_training = self.model.training
        self.model.eval()
        try:
            for rows in micro_batches:
                sub = rollout.select(rows)
                sub_logprobs, _, sub_values = rollout_forward(self.model, sub,
                                                              padding_free_capacity=packing(self.algo))
                width = sub.completion_ids.shape[1]
                logprobs[rows, :width] = sub_logprobs
                if sub_values is not None:
                    values[rows, :width] = sub_values
        finally:
            self.model.train(was_training)
        return logprobs, values

    def _reference_logprobs(self, rollout: Rollout, micro_batches: list[Tensor]) -> Tensor:
        forward = policy_forward(self.algo.padding_free, self.algo.padding_free_capacity)  # as the actor's
        out = torch.zeros(rollout.logprobs.shape, dtype=next(self.model.parameters()).dtype)
        for rows in micro_batches:
            sub = rollout.select(rows)
            out[rows, :sub.completion_ids.shape[1]] = self.reference.rollout_logprobs(sub, forward)
        return out

    def _step_batches(self, schedule: list[list[list[Tensor]]], metrics: dict[str, float]) -> list[StepBatch]:
        batch = self.last
        rollout, mask = batch.rollout, batch.rollout.response_mask.float()
        out = []
        for epoch, minibatches in enumerate(schedule):
            for index, micro_batches in enumerate(minibatches):
                rows = torch.cat(micro_batches)
                token_total = float(mask[rows].sum())
                normaliser = (token_total or 1.0) if self.algo.agg == "token-mean" else float(len(rows))
                micro = []
                for sub_rows in micro_batches:
                    sub = rollout.select(sub_rows)
                    width = sub.completion_ids.shape[1]
                    micro.append({name: getattr(batch, name)[sub_rows, :width]
                                  for name in ("old_logprobs", "values", "advantages", "returns")}
                                 | {"rollout": sub, "mask": mask[sub_rows, :width],
                                    "token_share": float(mask[sub_rows].sum()) / token_total if token_total else 0.0})
                if self.gold is not None:
                    self._add_gold(micro, [rollout.prompt_index[r] for r in micro_batches])
                tokens = int(rollout.prompt_mask[rows].sum() + rollout.response_mask[rows].sum())
                step_metrics = {**metrics, "ppo_epoch": epoch + 1, "minibatch": index + 1}
                if out:  # the rollout's cost is reported once, with the iteration's first step
                    step_metrics.update(generation_s=0.0, scoring_s=0.0)
                out.append(StepBatch(micro_batches=micro, normaliser=normaliser, tokens=tokens, metrics=step_metrics))
        return out

    def _add_gold(self, micro: list[dict[str, Any]], prompt_index: list[Tensor]) -> None:
        """Each micro-batch's gold rows (a prompt in the micro-batch that first has one of its completions)
        and the minibatch's gold-token count, the SFT term's normaliser."""
        seen: set[int] = set()
        counts = []
        for batch, prompts in zip(micro, prompt_index, strict=True):
            fresh = [p for p in dict.fromkeys(prompts.tolist()) if p not in seen]
            seen.update(fresh)
            batch["sft"], count = self.gold.batch(fresh)
            counts.append(count)
        for batch in micro:
            batch["sft_normaliser"] = sum(counts)

    def _write_samples(self, rollout: Rollout, completions: Any, scores: Any, score: Tensor,
                       sequence_kl: Tensor) -> None:
        if self.samples is None:
            return
        append_jsonl(self.samples, [{**sample_record(self.steps + 1, i, rollout, completions, scores),
                                     "score": score[i].item(), "kl": sequence_kl[i].item()}
                                    for i in range(len(completions))])


# ----------------------------------------------------------------------------------------------
# The loss.


def ppo_loss_fn(cfg: PPOAlgoConfig, max_new_tokens: int):
    """Clipped policy loss + vf_coef * clipped value loss - entropy_coef * entropy (+ sft_coef * the NLL of the
    micro-batch's gold answers, over the minibatch's gold tokens) of a micro-batch, already divided by the
    minibatch's normaliser; statistics are weighted by the micro-batch's token share."""
    pg_loss_fn = get_policy_loss(cfg.policy_loss)

    def loss_fn(model: ActorCritic, batch: dict[str, Any], normaliser: float) -> tuple[Tensor, dict[str, float]]:
        mask, share = batch["mask"], batch["token_share"]
        logprobs, entropy, values = rollout_forward(model, batch["rollout"], entropy_grad=cfg.entropy_coef > 0,
                                                    padding_free_capacity=packing(cfg))
        pg = pg_loss_fn(logprobs, batch["old_logprobs"], batch["advantages"], mask, clip_low=cfg.clip,
                        clip_high=None, dual_clip=None, agg=cfg.agg, normaliser=normaliser, max_length=max_new_tokens)
        loss, metrics = pg.loss, {"pg_loss": pg.loss.item()}
        if values is not None:  # critic-free advantages train no value
            vf = value_loss(values, batch["values"], batch["returns"], mask, clip=cfg.value_clip, agg=cfg.agg,
                            normaliser=normaliser, max_length=max_new_tokens)
            loss = loss + cfg.vf_coef * vf.loss
            metrics |= {"value_loss": vf.loss.item(), "value_clip_fraction": vf.clip_fraction.item() * share}
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * aggregate(entropy, mask, cfg.agg, normaliser, max_new_tokens)
        if cfg.sft_coef > 0 and batch.get("sft") is not None:
            gold_logprobs, gold_mask = response_logprobs(model.actor, batch["sft"])
            sft = sft_loss(gold_logprobs, gold_mask, normaliser=batch["sft_normaliser"])
            loss = loss + cfg.sft_coef * sft
            metrics["sft_loss"] = sft.item()
        ratio = torch.exp(logprobs.detach() - batch["old_logprobs"])
        metrics |= {"loss": loss.item(), "clip_fraction": pg.clip_fraction.item() * share,
                    "approx_kl": pg.approx_kl.item() * share, "ratio": masked_mean(ratio, mask).item() * share,
                    "entropy": masked_mean(entropy.detach(), mask).item() * share}
        return loss, metrics

    return loss_fn
