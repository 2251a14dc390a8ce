"""What the sampling recipes (the RL loop of `rl_loop`, rejection sampling) share: sampling settings, what a
completion is worth (weighted reward functions and the task that verifies answers), the reference
policy, the seeded stream of prompts, and the per-rollout statistics and sample records; and the settings
of the online RL recipes (`RLConfig`: one section per concern, one name per setting, the earlier names
kept as errors that name the new ones) with the checks they all need.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from posttrain.algos import ADVANTAGE_ESTIMATORS, AGG_MODES, KL_KINDS, POLICY_LOSSES, best_worst_pairs
from posttrain.config import ModelConfig, OptimConfig, RunConfig, param, section
from posttrain.data.columns import column_values
from posttrain.data.config import DataConfig
from posttrain.data.pipeline import Prepared, prepare_data
from posttrain.data.schemas import holds_as_answer, prompt_as_given, tools_as_given
from posttrain.data.tasks import TASKS, get_task
from posttrain.data.tasks.base import Task
from posttrain.errors import ConfigError, DataError
from posttrain.eval import heldout
from posttrain.eval.accuracy import EvalConfig
from posttrain.eval.heldout import completions_of
from posttrain.models.adapters import AdapterConfig
from posttrain.rewards.error_log import RewardErrorLog
from posttrain.rewards.function_process import DEFAULT_TIMEOUT_S
from posttrain.rewards.functions import (
    REWARD_FUNCTIONS,
    Completions,
    Scores,
    WeightedRewards,
    reward_function,
)
from posttrain.rollout import ENGINES, Rollout, RolloutEngine, SamplingParams
from posttrain.rollout.base import concat_rollouts
from posttrain.rollout.vllm_engine import check_vllm_available
from posttrain.train import dist
from posttrain.train.engine import TrainConfig
from posttrain.train.reference import Reference
from posttrain.train.sources import ShuffledStepSource


def padding_free_capacity_param() -> Any:
    """The `padding_free_capacity` field of an RL recipe's padding-free forward (GRPO's loss, PPO's algorithm)."""
    return param(256, "Padding-free: samples are packed into rows of at most this many tokens (or the longest "
                      "sample's), of the width up to it that pads least; attention costs row length x tokens.", ge=1)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled, and how many per prompt."""

    engine: str = param("local", "Rollout engine.", choices=ENGINES)
    max_new_tokens: int = param(32, "Most tokens per completion; longer ones are cut and flagged truncated.", ge=1)
    temperature: float = param(1.0, "Sampling temperature (the policy's logprobs are taken at the same one).", gt=0)
    top_k: int = param(0, "Sample among the k most likely tokens (0: off).", ge=0)
    top_p: float = param(1.0, "Nucleus sampling mass (1: off).", gt=0, le=1)
    stop: list[str] = param([], "Stop strings that end a completion besides EOS.")
    samples_per_prompt: int = param(1, "Completions sampled per prompt (G: a group of completions that group "
                                       "baselines compare); a round or batch size counts completions.", ge=1)
    max_sequences: int = param(0, "Most completions sampled at once: a round is sampled in parts of that many "
                                  "(whole groups: one group at least), in order, from the round's one random stream "
                                  "(0: the round at once; other parts draw other samples, as another seed would). "
                                  "Bounds the local engine's KV cache, which holds every sequence of a part (2 x "
                                  "layers x hidden size x 4 bytes a token, fp32). RL stages, rejection, on-policy "
                                  "DPO (an on-policy reward model samples pairs.prompts_per_batch at a time).",
                               ge=0)

    def params(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, stop=tuple(self.stop), n=self.samples_per_prompt)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    functions: dict[str, float] = param({"correct": 1.0}, "Reward functions and their weights (r = sum w_k f_k): "
                                        "correct, format, steps, reward_model, grader, one registered with "
                                        "posttrain.rewards.register_reward_function, or an import path "
                                        "(my_pkg.rewards:length, or rewards.py:length) of a function "
                                        "fn(batch) or fn(prompts, completions, **columns).")
    task: str | None = param(None, "Built-in task whose answer extractor and verifiers score completions "
                                   "(None: data.source when it is a built-in task).")
    model_path: str | None = param(None, "Reward model directory (from `posttrain rm`) for the reward_model function.")
    grader: str | None = param(None, "Grader file (YAML, the public fine-tuning grader schema) or shipped grader "
                                     "name (arith-partial) for the `grader` function (posttrain.rewards.graders).")
    max_error_fraction: float = param(0.5, "Stop the run when one reward function errs (raises, times out, "
                                           "returns NaN) on more than this share of a batch; every error is kept "
                                           "in grader_errors.jsonl (1: never stop).", ge=0, le=1)
    timeout_s: float = param(DEFAULT_TIMEOUT_S, "Hard limit in seconds on one call (up to 512 completions) of a "
                                                "reward function named by import path, which runs in a child "
                                                "process: past it the process is killed, the call's completions "
                                                "score 0 with an error each, and the next call starts a new process.",
                             gt=0)
    in_process: bool = param(False, "Run reward functions named by import path in the trainer's own process "
                                    "instead (no time limit, no isolation), for one that must share its memory "
                                    "(a model on the trainer's GPU).")

    def function_context(self) -> dict[str, Any]:
        """What `WeightedRewards.from_config` needs to run import-path functions as configured."""
        return {"timeout_s": self.timeout_s, "in_process": self.in_process}


def check_reward_functions(cfg: RewardConfig) -> None:
    """Every named function exists: registered, or importable from its path (imported now, before any work, in
    the child process it will run in unless `in_process`)."""
    for name in cfg.functions:
        if ":" in name and name not in REWARD_FUNCTIONS:
            try:
                reward_function(name, **cfg.function_context())
            except ValueError as err:
                raise ConfigError(str(err), field=f"reward.functions.{name}") from None
    unknown = sorted(n for n in cfg.functions if n not in REWARD_FUNCTIONS and ":" not in n)
    if unknown:
        raise ConfigError(f"unknown reward function(s) {', '.join(unknown)}; registered: "
                          f"{', '.join(sorted(REWARD_FUNCTIONS))}, or give an import path (module:function)",
                          field="reward.functions")


def check_gold_answers(dataset: Any, name: str, cfg: Any, uses_gold: bool = False) -> None:
    """Prompt-only rows (no gold answer) train only with rewards that do not compare with one, and the task's
    check only with answers it can match (`heldout.check_gold_answers`, which `posttrain eval --data` shares);
    `cfg` is the stage's config (its reward and data sections)."""
    heldout.check_gold_answers(dataset, name, cfg.reward.functions, uses_gold, resolve_task(cfg))
    advantage = getattr(cfg, "advantage", None)
    verified = getattr(advantage, "step_scorer", "") == "verifier"
    if getattr(advantage, "supervision", "outcome") == "process" and verified:
        # the verifier scores each step line against the row's gold steps: without them every step would score 0
        bare = next((line for line, steps in zip(dataset["line"], dataset["steps"], strict=True) if not steps), None)
        if bare is not None:
            raise DataError("the row has no gold steps (a `steps` column: the value each step reaches), which "
                            "process supervision's step verifier reads: give them, score steps with a process "
                            "reward model (advantage.step_scorer=prm), or use advantage.supervision=outcome",
                            file=name, line=bare, field="steps")


def resolve_task(cfg: Any) -> Task | None:
    """The task that verifies answers: cfg.reward.task, else the built-in task the prompts (cfg.data) come from."""
    reward: RewardConfig = cfg.reward
    data: DataConfig = cfg.data
    name = reward.task or (data.source if data.source in TASKS else None)
    return get_task(name) if name else None


def build_rewards(cfg: RewardConfig, task: Task | None, dataset: Any = None,
                  eval_cfg: EvalConfig | None = None) -> WeightedRewards:
    """The weighted reward functions; with the prepared `dataset`, a grader's templates are checked against its
    columns now, not at the first rollout; with the stage's `eval_cfg`, its eval.correct_by against their names
    (both before the run directory is written)."""
    try:
        rewards = WeightedRewards.from_config(cfg.functions, task=task, reward_model_path=cfg.model_path,
                                              grader_path=cfg.grader, **cfg.function_context())
    except ValueError as err:
        raise ConfigError(str(err), field="reward.functions") from None
    if eval_cfg is not None:
        heldout.CorrectRule.of(eval_cfg).check(rewards.functions, "eval.correct_by")
    if dataset is not None:
        rewards.check_grader_rows(dataset)
    return rewards


def log_reward_errors(rewards: WeightedRewards, cfg: RewardConfig, run_dir: Path) -> WeightedRewards:
    """Every reward error of the run kept in <run_dir>/grader_errors.jsonl, the first of each kind printed, and
    the run stopped when they pass reward.max_error_fraction of a batch (`posttrain.rewards.error_log`)."""
    rewards.error_log = RewardErrorLog(run_dir, cfg.max_error_fraction)
    return rewards


def reward_errors_of_step(rewards: WeightedRewards, step: int) -> None:
    """Have the reward errors scored from now on (a round's samples) name `step`, the first step they train: a
    resume from an earlier checkpoint cuts grader_errors.jsonl back by it, as metrics.jsonl."""
    if isinstance(rewards.error_log, RewardErrorLog):
        rewards.error_log.step = step
        # A round's errors are judged on its own rows (`check_reward_errors`): under torchrun, those an evaluation
        # scored since the last round (kept in grader_errors.jsonl) are not counted with them.
        rewards.error_log.take_unchecked()


def check_reward_errors(rewards: WeightedRewards) -> None:
    """Under torchrun, once every rank has scored its share of a round: reward.max_error_fraction judged on the
    round's rows of every rank, alike on each, so that all stop together with the one-line error (one rank stopped
    alone on its own batch, and the others died in their next collective with gloo's traceback)."""
    log = rewards.error_log
    if not isinstance(log, RewardErrorLog) or log.rank is None:
        return
    errors, rows = log.take_unchecked()
    log.check_fraction(dist.all_gather_list(errors), int(dist.all_reduce_sum(float(rows))),
                       scope="this round (every rank's)")


def build_reference(beta: float, adapter: AdapterConfig, model: torch.nn.Module) -> Reference | None:
    """A frozen copy of the starting policy when beta > 0 (with an adapter: None, the adapter-disabled
    policy is the reference, see `adapter_reference`)."""
    if beta == 0 or adapter.method != "none":
        return None
    return Reference.frozen_copy(model)


def adapter_reference(reference: Reference | None, beta: float, model: torch.nn.Module) -> Reference | None:
    """After the adapter is applied: the policy with its adapter disabled, when a reference is needed and
    no frozen copy was made."""
    if beta > 0 and reference is None:
        return Reference(model, adapter_disabled=True)
    return reference


class PromptStream:
    """Prompts for generation rounds, `per_round` at a time in a seeded shuffle (resumable by position),
    and the round counter that seeds each round's sampling.

    Under torchrun each rank samples its own share of the round's prompts (`dist.rank_slice`), and the
    sampling seed also depends on the rank: with one seed every rank would draw the very same random
    numbers (the same completions for the same prompt, correlated ones across prompts). Rank 0 (and a
    single process) keeps the seed `seed * 1_000_003 + round`.
    """

    RANK_STRIDE = 1_000_000_007  # far apart from every (seed, round) seed of another rank

    def __init__(self, dataset: Any, per_round: int, seed: int, source: Any = None, max_sequences: int = 0) -> None:
        """`source`: the rows as read (`Prepared.source`), whose digest a resume compares; `max_sequences`:
        `sampling.max_sequences`."""
        self.dataset, self.seed, self.rank = dataset, seed, dist.context().rank
        self.max_sequences = max_sequences
        self.order = ShuffledStepSource(len(dataset), per_round, per_round, seed, collate=list,
                                        count=lambda indices: (0.0, 0), rows=source)
        self.rounds = 0

    def sample(self, engine: RolloutEngine, params: SamplingParams,
               advance: Callable[[int], None] = lambda prompts: None) -> tuple[list[dict[str, Any]], Rollout]:
        """The next round's rows and their completions; `advance(prompts)` as each part is sampled."""
        rows = [self.dataset[i] for i in self.order.next_step().micro_batches[0]]
        generator = torch.Generator().manual_seed(self.sampling_seed())
        step = max(1, self.max_sequences // params.n) if self.max_sequences else len(rows)
        parts = []
        for start in range(0, len(rows), step):
            prompts = [row["prompt_input_ids"] for row in rows[start:start + step]]
            parts.append(engine.generate(prompts, params, generator=generator))
            advance(len(prompts))
        self.rounds += 1
        return rows, parts[0] if len(parts) == 1 else concat_rollouts(parts)

    @property
    def per_round(self) -> int:
        """Prompts this rank samples per round: its share of the round's."""
        return len(dist.rank_slice(list(range(self.order.batch_size))))

    def sampling_seed(self) -> int:
        """The seed of the coming round's sampling on this rank."""
        return self.seed * 1_000_003 + self.rounds + self.rank * self.RANK_STRIDE

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": self.order.state_dict(), "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state["prompts"])
        self.rounds = state["rounds"]


class GoldAnswers:
    """The data of an SFT term on reference answers: a round's prompts, each with its gold answer as the
    assistant turn (for a built-in task, exactly the completion its SFT data trains on), through the
    data pipeline (chat template, response mask, EOS). A gold row longer than data.max_length is left out.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, data: DataConfig) -> None:
        self.tokenizer = tokenizer
        self.data = DataConfig(source="<gold>", max_length=data.max_length, template=data.template,
                               thinking=data.thinking, truncation="drop")
        self.prepared: Prepared | None = None
        self.row_of: dict[int, int] = {}

    def prepare(self, rows: list[dict[str, Any]]) -> None:
        """Tokenise the gold answers of a round's prompt rows (row i is prompt index i of the rollout)."""
        # with the row's tools: the gold answer is trained in the context its prompt is sampled in
        pairs = [{"prompt": row["prompt"], "completion": row["answer"],
                  "tools": json.loads(row.get("row") or "{}").get("tools")} for row in rows]
        self.prepared = prepare_data(self.data, self.tokenizer, accepts=("completion",), rows=pairs)
        self.row_of = {line - 1: i for i, line in enumerate(column_values(self.prepared.dataset, "line"))}

    def batch(self, prompts: list[int]) -> tuple[dict[str, Any] | None, float]:
        """The collated gold rows of these prompt indices and their trained-token count (None, 0: none)."""
        samples = [self.prepared.dataset[self.row_of[p]] for p in prompts if p in self.row_of]
        if not samples:
            return None, 0.0
        return self.prepared.collator(samples), float(sum(sum(s["response_mask"]) for s in samples))


def preference_rows(completions: Completions, scores: Scores, prompt_index: Tensor,
                    min_margin: float, finished: Tensor | None = None) -> list[dict[str, Any]]:
    """Preference rows from sampled completions: each prompt's best- and worst-scored completions
    (`algos.best_worst_pairs`, the chosen beating the rejected by more than `min_margin`) as one row. A completion
    that no preference row can hold as an answer (no text: EOS at once; a stray <think> tag, `holds_as_answer`),
    one whose reward failed (its 0 is no score: a right answer whose grader timed out would be the rejected one),
    or one `finished` [B] leaves out, takes part in no pair; two equal texts make none."""
    texts, failed = completions.completions, scores.failed()
    usable = [i for i, text in enumerate(texts)
              if holds_as_answer(text) and not failed[i] and (finished is None or finished[i])]
    found = [(usable[c], usable[r])
             for c, r in best_worst_pairs(scores.total[usable], prompt_index[usable], min_margin)]
    return [{"prompt": completions.prompts[c], "chosen": texts[c], "rejected": texts[r],
             "tools": completions.columns[c].get("tools")} for c, r in found if texts[c] != texts[r]]


def heldout_reward_part(cfg: Any, tokenizer: PreTrainedTokenizerBase, rows: Prepared | None,
                        rewards: WeightedRewards) -> list[heldout.Part]:
    """The stage's reward functions (no missing-EOS penalty: the rewards themselves) on greedy completions of the
    held-out prompts `rows`, within the stage's sampling.max_new_tokens, for `heldout.Evaluation`."""
    return heldout.reward_part(tokenizer, rows, lambda rollout, batch: rewards(completions_of(rollout, batch)),
                               cfg.sampling.max_new_tokens, cfg.eval, rewards.functions)


def reward_metrics(rollout: Rollout, completions: Completions, scores: Scores, task: Task | None) -> dict[str, float]:
    """The reward (total and by function), completion length, truncation and, with a task, accuracy. The rewards'
    means and spreads are of every rank's completions (`dist.mean_and_std_over_ranks`)."""
    reward, reward_std = dist.mean_and_std_over_ranks(scores.total)
    metrics = {"reward": reward, "reward_std": reward_std,
               "completion_length": rollout.completion_lengths.float().mean().item(),
               "truncated": rollout.truncated.float().mean().item()}
    for name, values in scores.by_function.items():
        metrics[f"reward_{name}"], metrics[f"reward_{name}_std"] = dist.mean_and_std_over_ranks(values)
    if task is not None and None not in completions.answers:
        metrics["accuracy"] = sum(task.verify(c, a) for c, a in
                                  zip(completions.completions, completions.answers, strict=True)) / len(completions)
    return metrics


def sample_record(step: int, i: int, rollout: Rollout, completions: Completions, scores: Scores) -> dict[str, Any]:
    """One line of samples.jsonl: a completion with its prompt, gold answer, rewards and finish reason."""
    columns = completions.columns[i] if completions.columns else {}
    return {"step": step, "group": int(rollout.prompt_index[i]), "prompt": prompt_as_given(completions.prompts[i]),
            **tools_as_given(columns), "completion": completions.completions[i], "answer": completions.answers[i],
            "reward": scores.total[i].item(), "rewards": {k: v[i].item() for k, v in scores.by_function.items()},
            "finish_reason": rollout.finish_reasons[i], "truncated": rollout.finish_reasons[i] == "length"}


# ----------------------------------------------------------------------------------------------
# The settings of the online RL recipes (`rl_loop`), each under one name.

KL_PLACEMENTS = ("reward", "loss")
KL_CONTROLLERS = ("fixed", "adaptive")
# The registry's estimators that compare the completions of a prompt with each other, and all those that read
# no values: no critic is built or trained for them.
GROUP_BASELINES = ("grpo", "grpo_batch_std", "dr_grpo", "rloo", "grpo_process")
CRITIC_FREE = (*GROUP_BASELINES, "reinforce_baseline")


@dataclasses.dataclass(frozen=True)
class RLRewardConfig(RewardConfig):
    missing_eos_penalty: float | None = param(None, "Subtracted from the score of completions cut by "
                                                    "max_new_tokens (None: no penalty).", ge=0)


@dataclasses.dataclass(frozen=True)
class KLConfig:
    coef: float = param(0.0, "beta: weight of the KL to the reference policy (0: no reference model is loaded).",
                        ge=0)
    kind: str = param("k3", "KL estimator (k1 = logp - ref_logp; k3 = exp(ref - logp) - (ref - logp) - 1).",
                      choices=KL_KINDS)
    placement: str = param("loss", "reward: -beta * KL_t of the sampling policy joins every token's reward "
                                   "(RLHF); loss: beta * KL_t of the trained policy joins every token's loss "
                                   "(GRPO).", choices=KL_PLACEMENTS)
    controller: str = param("fixed", "Keep beta fixed, or adapt it towards `target` (Ziegler et al. 2019).",
                            choices=KL_CONTROLLERS)
    target: float = param(6.0, "Adaptive controller: target KL per completion (summed over its tokens).", gt=0)
    horizon: float = param(10_000, "Adaptive controller: horizon in completions (how slowly beta moves).", gt=0)


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    estimator: str = param("grpo", "Advantage estimator of the algos registry: gae (GAE on a critic's values), "
                                   "grpo, grpo_batch_std, dr_grpo, rloo (baselines over the samples_per_prompt "
                                   "completions of a prompt), reinforce_baseline (the batch mean), or one "
                                   "registered with posttrain.algos.register_advantage_estimator.",
                           choices=ADVANTAGE_ESTIMATORS)
    gamma: float = param(1.0, "GAE discount.", ge=0, le=1)
    lam: float = param(0.95, "GAE lambda (0: one-step TD error; 1: Monte-Carlo return minus V).", ge=0, le=1)
    eps: float = param(1e-6, "Added to a group's reward std before dividing.", ge=0)
    whiten: bool = param(False, "Normalise the advantages over the round's completion tokens (of every rank): to "
                                "mean 0 and std 1, or under a group baseline (grpo, rloo, ...) to std 1 alone, so "
                                "that each group stays centred on its own mean and a tied group at 0.")
    skip_zero_variance: bool = param(False, "Leave out groups whose completions all get zero advantage (equal "
                                            "rewards under a group baseline): they add no gradient, only tokens "
                                            "to the normaliser.")


@dataclasses.dataclass(frozen=True)
class GroupFilterConfig:
    enabled: bool = param(False, "Dynamic sampling (balanced online difficulty filtering): a round trains only on "
                                 "groups whose completions disagree and whose mean score lies in [low, high] (for "
                                 "0/1 rewards, the prompt's success rate), and samples more prompts until it has "
                                 "its number of such groups. Needs samples_per_prompt >= 2.")
    low: float = param(0.0, "Lowest mean score of a kept group.")
    high: float = param(1.0, "Highest mean score of a kept group.")
    oversample: float = param(1.0, "Prompts sampled per batch, as a multiple of the round's prompts.", ge=1)
    max_batches: int = param(4, "Most sampling batches per round; a round still short of informative groups after "
                                "them fills up with the others, those with spread and nearest the band first.",
                             ge=1)


@dataclasses.dataclass(frozen=True)
class RLLossConfig:
    policy_loss: str = param("ppo", "Policy loss from the algos registry (ppo: per-token clipped ratio; gspo: "
                                    "sequence ratio).", choices=POLICY_LOSSES)
    agg: str = param("token-mean", "Loss aggregation: token-mean (DAPO), seq-mean-token-mean (GRPO), "
                                   "seq-mean-token-sum, seq-mean-token-sum-norm (Dr. GRPO).", choices=AGG_MODES)
    clip_low: float | None = param(None, "Lower clip range: the ratio is clipped at 1 - clip_low (None: the policy "
                                         "loss's own, ppo 0.2, gspo the paper's 3e-4 with clip_high 4e-4: its "
                                         "sequence ratio barely moves).", ge=0, lt=1)
    clip_high: float | None = param(None, "Upper clip range (None: clip_low, or the policy loss's own when clip_low is "
                                          "None; larger: DAPO's clip-higher).", ge=0)
    dual_clip: float | None = param(None, "Dual clip c > 1: a negative advantage's loss is at most -c A "
                                          "(None: off).", gt=1)
    value_clip: float | None = param(0.2, "Value clip range around V_old (None: unclipped). Critic only.", ge=0)
    vf_coef: float = param(0.1, "Weight of the value loss. Critic only.", ge=0)
    entropy_coef: float = param(0.0, "Weight of the entropy bonus (0: off).", ge=0)
    sft_coef: float = param(0.0, "alpha: loss = L_RL + alpha * L_SFT, L_SFT the token-mean NLL of the gold answers "
                                 "(the data's `answer`, as the assistant turn) of each minibatch's prompts (0: off).",
                            ge=0)
    mask_truncated: bool = param(False, "Leave completions cut by max_new_tokens out of the loss (they still count "
                                        "in their group's baseline).")


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    rollout_batch_size: int | None = param(None, "Completions sampled per round (None: train.batch_size): a "
                                                 "multiple of train.batch_size, the minibatch of one optimizer "
                                                 "step.", ge=1)
    epochs: int = param(1, "Passes over each round (each a fresh shuffle into minibatches; GRPO's "
                           "num_iterations).", ge=1)
    padding_free: bool = param(True, "Forwards over the real tokens only (packed rows, block-diagonal mask) "
                                     "instead of the rollout's padded layout: the same logprobs and values, less "
                                     "compute. Prefix-tuning adapters always use the padded layout.")
    padding_free_capacity: int = padding_free_capacity_param()
    share_prompts: bool = param(True, "Padding-free: the samples of one prompt follow a single copy of it in "
                                      "every pass (each completion attends to it and to itself): the same "
                                      "logprobs, values and gradients, without recomputing the prompt "
                                      "samples_per_prompt times.")
    micro_batch_tokens: int | None = param(None, "Each forward/backward (and no-grad) pass computes at most this "
                                                 "many token positions (packed rows x their width; padded: rows x "
                                                 "their longest prompt + completion): a micro-batch of "
                                                 "train.micro_batch_size rows is cut further, with the same "
                                                 "gradient and a peak of activation memory that no longer grows "
                                                 "with the minibatch (None: train.micro_batch_size alone).", ge=1)


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """The sections of every online RL recipe; a recipe subclasses it with its own defaults and sections."""

    RENAMED: ClassVar[dict[str, str]] = {
        "sampling.group_size": "sampling.samples_per_prompt", "loss.beta": "kl.coef", "loss.kl_kind": "kl.kind",
        "loss.num_iterations": "update.epochs", "loss.padding_free": "update.padding_free",
        "loss.padding_free_capacity": "update.padding_free_capacity",
        "advantage.scale": "advantage.estimator (scale group, batch, none = estimator grpo, grpo_batch_std, "
                           "dr_grpo)",
        "ppo.rollout_batch_size": "update.rollout_batch_size", "ppo.epochs": "update.epochs",
        "ppo.gamma": "advantage.gamma", "ppo.lam": "advantage.lam", "ppo.advantage": "advantage.estimator",
        "ppo.whiten_advantages": "advantage.whiten", "ppo.policy_loss": "loss.policy_loss", "ppo.agg": "loss.agg",
        "ppo.clip": "loss.clip_low", "ppo.value_clip": "loss.value_clip", "ppo.vf_coef": "loss.vf_coef",
        "ppo.entropy_coef": "loss.entropy_coef", "ppo.kl_coef": "kl.coef", "ppo.kl_kind": "kl.kind",
        "ppo.kl_controller": "kl.controller", "ppo.kl_target": "kl.target", "ppo.kl_horizon": "kl.horizon",
        "ppo.sft_coef": "loss.sft_coef", "ppo.missing_eos_penalty": "reward.missing_eos_penalty",
        "ppo.padding_free": "update.padding_free", "ppo.padding_free_capacity": "update.padding_free_capacity",
        "ppo.micro_batch_tokens": "update.micro_batch_tokens",
    }

    run: RunConfig = section(lambda: RunConfig(name="rl"), "Run directory, seed, logging.")
    model: ModelConfig = section(lambda: ModelConfig(path="runs/sft/final"), "The policy to train (the SFT model).")
    adapter: AdapterConfig = section(AdapterConfig, "Full fine-tuning or LoRA (with an adapter, the adapter-"
                                                    "disabled policy is the reference).")
    data: DataConfig = section(lambda: DataConfig(source="arith", size=20_000, max_length=256),
                               "Prompts with gold answers (verifiable rows).")
    optim: OptimConfig = section(lambda: OptimConfig(lr=1e-5, schedule="constant"), "Optimizer and schedule.")
    train: TrainConfig = section(lambda: TrainConfig(max_steps=100, batch_size=64, micro_batch_size=64),
                                 "max_steps counts optimizer steps (minibatches); batch_size (the minibatch) and "
                                 "micro_batch_size count completions.")
    sampling: SamplingConfig = section(SamplingConfig, "How completions are sampled.")
    reward: RLRewardConfig = section(RLRewardConfig, "What a completion is worth (the score at its last token).")
    kl: KLConfig = section(KLConfig, "The KL to the reference policy: its weight, estimator and place.")
    advantage: AdvantageConfig = section(AdvantageConfig, "The advantage estimator.")
    filter: GroupFilterConfig = section(GroupFilterConfig, "Dynamic sampling: which groups of completions a round "
                                                            "trains on.")
    loss: RLLossConfig = section(RLLossConfig, "The clipped policy loss and its extra terms.")
    update: UpdateConfig = section(UpdateConfig, "How a round trains: epochs, minibatches, micro-batches.")
    eval: EvalConfig = section(EvalConfig, "Held-out evaluation: the rewards of greedy completions of held-out prompts "
                                           "(eval.source or data.eval_split), exact match on a built-in task.")
    eval_before: bool = param(True, "Also evaluate the starting model, to report the gain.")


def rollout_batch_size(cfg: RLConfig) -> int:
    return cfg.update.rollout_batch_size or cfg.train.batch_size


def sampling_batch_prompts(cfg: RLConfig) -> int:
    """Prompts of one sampling batch (of every rank): the round's, or with dynamic sampling `filter.oversample`
    times as many, rounded up to a multiple of the number of ranks."""
    prompts = rollout_batch_size(cfg) // cfg.sampling.samples_per_prompt
    if not cfg.filter.enabled:
        return prompts
    world = dist.context().world_size
    return math.ceil(math.ceil(prompts * cfg.filter.oversample) / world) * world


def steps_per_round(cfg: RLConfig) -> int:
    """Optimizer steps one round of samples serves: epochs x minibatches."""
    return cfg.update.epochs * rollout_batch_size(cfg) // cfg.train.batch_size


def check_sampling(sampling: SamplingConfig) -> None:
    """Settings of `sampling` that go together: parts of a round (max_sequences) are the local engine's; vLLM
    schedules its own memory, and each part would sync the policy's weights into it again."""
    if sampling.max_sequences and sampling.engine != "local":
        raise ConfigError(f"sampling.max_sequences bounds the local engine's KV cache; sampling.engine="
                          f"{sampling.engine} schedules its own memory (vLLM: gpu_memory_utilization), and would "
                          "load the policy's weights again for each part: leave it 0", field="sampling.max_sequences")


def check_rl_config(cfg: RLConfig, stage: str) -> None:
    """The checks every RL recipe needs before any model is loaded."""
    if not cfg.model.path:
        raise ConfigError(f"{stage} trains an existing model: set model.path (e.g. runs/sft/final)",
                          field="model.path")
    if cfg.adapter.method == "prefix":
        raise ConfigError(f"{stage} trains full weights or LoRA (prefix-tuning: sft, dpo, kto, rejection)",
                          field="adapter.method")
    check_sampling(cfg.sampling)
    if cfg.sampling.engine == "vllm":  # before the model loads and the starting model is evaluated, not after
        check_vllm_available(field="sampling.engine")
    rollout = rollout_batch_size(cfg)
    if rollout % cfg.train.batch_size:
        raise ConfigError(f"update.rollout_batch_size ({rollout}) must be a multiple of train.batch_size "
                          f"({cfg.train.batch_size}, the minibatch)", field="update.rollout_batch_size")
    if rollout % cfg.sampling.samples_per_prompt:
        raise ConfigError(f"the completions of a round ({rollout}) must be a multiple of "
                          f"sampling.samples_per_prompt ({cfg.sampling.samples_per_prompt})",
                          field="sampling.samples_per_prompt")
    world, prompts = dist.context().world_size, rollout // cfg.sampling.samples_per_prompt
    if prompts % world:  # each rank samples and trains its share of the round's prompts (their groups)
        raise ConfigError(f"the {prompts} prompts of a round (update.rollout_batch_size {rollout} / sampling."
                          f"samples_per_prompt {cfg.sampling.samples_per_prompt}) do not split evenly over {world} "
                          f"ranks: make them a multiple of {world}", field="update.rollout_batch_size")
    steps = steps_per_round(cfg)
    if cfg.train.save_every % steps:
        # A checkpoint holds no rollout: one taken inside a round would resume with a fresh one, a different
        # run from the one that went on.
        raise ConfigError(f"train.save_every ({cfg.train.save_every}) must be a multiple of the optimizer steps of "
                          f"one round, update.epochs x update.rollout_batch_size / train.batch_size = "
                          f"{cfg.update.epochs} x {rollout} / {cfg.train.batch_size} = {steps} (or 0), so that "
                          f"checkpoints fall between rounds", field="train.save_every")
    if cfg.advantage.estimator in GROUP_BASELINES and cfg.sampling.samples_per_prompt < 2:
        raise ConfigError(f"advantage.estimator={cfg.advantage.estimator} compares the completions of a prompt "
                          "with each other: set sampling.samples_per_prompt >= 2",
                          field="sampling.samples_per_prompt")
    if cfg.filter.enabled and cfg.sampling.samples_per_prompt < 2:
        raise ConfigError("filter.enabled keeps groups whose completions disagree: set sampling.samples_per_prompt "
                          ">= 2", field="sampling.samples_per_prompt")
    if cfg.filter.low > cfg.filter.high:
        raise ConfigError(f"filter.low ({cfg.filter.low}) must not exceed filter.high ({cfg.filter.high})",
                          field="filter.low")
    if cfg.kl.controller == "adaptive" and cfg.kl.coef == 0:
        raise ConfigError("the adaptive KL controller scales kl.coef: set kl.coef > 0", field="kl.coef")
    if cfg.kl.coef > 0 and cfg.kl.placement == "loss" and cfg.kl.kind == "k1":
        # k1's value is an unbiased estimate of the KL, but as a loss term on the policy's own samples its gradient,
        # E[grad log pi], is zero: the run would train with no KL regularisation at all.
        raise ConfigError("kl.kind=k1 in the loss regularises nothing: on the policy's own samples its expected "
                          "gradient is zero; use kl.kind=k3 (GRPO's) or k2 in the loss, or kl.placement=reward "
                          "(RLHF's k1 penalty in the rewards)", field="kl.kind")
    check_reward_functions(cfg.reward)
