"""What the sampling recipes (the RL loop of `rl_loop`, rejection sampling) share: sampling settings, what a
completion is worth (weighted reward functions and the task that verifies answers), the reference
policy, the seeded stream of prompts, and the per-rollout statistics and sample records.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from posttrain.config import param
from posttrain.data.config import DataConfig
from posttrain.data.pipeline import Prepared, prepare_data
from posttrain.data.tasks import TASKS, get_task
from posttrain.data.tasks.base import Task
from posttrain.errors import ConfigError
from posttrain.models.adapters import AdapterConfig
from posttrain.rewards.functions import REWARD_FUNCTIONS, Completions, Scores, WeightedRewards
from posttrain.rollout import ENGINES, Rollout, RolloutEngine, SamplingParams
from posttrain.train import dist
from posttrain.train.reference import Reference
from posttrain.train.sources import ShuffledStepSource


def padding_free_capacity_param() -> Any:
    """The `padding_free_capacity` field of an RL recipe's padding-free forward (GRPO's loss, PPO's algorithm)."""
    return param(256, "Padding-free: samples are packed into rows of at most this many tokens (or the longest "
                      "sample's); attention costs row length x tokens.", ge=1)


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

    def params(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, stop=tuple(self.stop), n=self.samples_per_prompt)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    functions: dict[str, float] = param({"correct": 1.0}, "Reward functions and their weights (r = sum w_k f_k): "
                                        "correct, format, steps, reward_model, grader, or one registered with "
                                        "posttrain.rewards.register_reward_function.")
    task: str | None = param(None, "Built-in task whose answer extractor and verifiers score completions "
                                   "(None: data.source when it is a built-in task).")
    model_path: str | None = param(None, "Reward model directory (from `posttrain rm`) for the reward_model function.")
    grader: str | None = param(None, "Grader file (YAML, the public fine-tuning grader schema) or shipped grader "
                                     "name (arith-partial) for the `grader` function (posttrain.rewards.graders).")


def check_reward_functions(cfg: RewardConfig) -> None:
    unknown = sorted(set(cfg.functions) - set(REWARD_FUNCTIONS))
    if unknown:
        raise ConfigError(f"unknown reward function(s) {', '.join(unknown)}; registered: "
                          f"{', '.join(sorted(REWARD_FUNCTIONS))}", field="reward.functions")


def resolve_task(cfg: Any) -> Task | None:
    """The task that verifies answers: cfg.reward.task, else the built-in task the prompts (cfg.data) come from."""
    reward: RewardConfig = cfg.reward
    data: DataConfig = cfg.data
    name = reward.task or (data.source if data.source in TASKS else None)
    return get_task(name) if name else None


def build_rewards(cfg: RewardConfig, task: Task | None) -> WeightedRewards:
    try:
        return WeightedRewards.from_config(cfg.functions, task=task, reward_model_path=cfg.model_path,
                                           grader_path=cfg.grader)
    except ValueError as err:
        raise ConfigError(str(err), field="reward.functions") from None


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

    def __init__(self, dataset: Any, per_round: int, seed: int) -> None:
        self.dataset, self.seed, self.rank = dataset, seed, dist.context().rank
        self.order = ShuffledStepSource(len(dataset), per_round, per_round, seed, collate=list,
                                        count=lambda indices: (0.0, 0))
        self.rounds = 0

    def sample(self, engine: RolloutEngine, params: SamplingParams) -> tuple[list[dict[str, Any]], Rollout]:
        rows = [self.dataset[i] for i in self.order.next_step().micro_batches[0]]
        generator = torch.Generator().manual_seed(self.sampling_seed())
        rollout = engine.generate([row["prompt_input_ids"] for row in rows], params, generator=generator)
        self.rounds += 1
        return rows, rollout

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
        pairs = [{"prompt": row["prompt"], "completion": row["answer"]} for row in rows]
        self.prepared = prepare_data(self.data, self.tokenizer, accepts=("completion",), rows=pairs)
        self.row_of = {line - 1: i for i, line in enumerate(self.prepared.dataset["line"])}

    def batch(self, prompts: list[int]) -> tuple[dict[str, Any] | None, float]:
        """The collated gold rows of these prompt indices and their trained-token count (None, 0: none)."""
        samples = [self.prepared.dataset[self.row_of[p]] for p in prompts if p in self.row_of]
        if not samples:
            return None, 0.0
        return self.prepared.collator(samples), float(sum(sum(s["response_mask"]) for s in samples))


def completions_of(rollout: Rollout, rows: list[dict[str, Any]]) -> Completions:
    """What the reward functions read, row by row of the rollout (row i completes prompt prompt_index[i])."""
    index = rollout.prompt_index.tolist()
    return Completions(prompts=[rows[i]["prompt"] for i in index], completions=list(rollout.texts),
                       answers=[rows[i]["answer"] for i in index],
                       steps=[list(rows[i].get("steps") or []) for i in index])


def _std(values: Tensor) -> float:
    return values.std().item() if len(values) > 1 else 0.0


def reward_metrics(rollout: Rollout, completions: Completions, scores: Scores, task: Task | None) -> dict[str, float]:
    """The reward (total and by function), completion length, truncation and, with a task, accuracy."""
    metrics = {"reward": scores.total.mean().item(), "reward_std": _std(scores.total),
               "completion_length": rollout.completion_lengths.float().mean().item(),
               "truncated": rollout.truncated.float().mean().item()}
    for name, values in scores.by_function.items():
        metrics[f"reward_{name}"] = values.mean().item()
        metrics[f"reward_{name}_std"] = _std(values)
    if task is not None:
        metrics["accuracy"] = sum(task.verify(c, a) for c, a in
                                  zip(completions.completions, completions.answers, strict=True)) / len(completions)
    return metrics


def sample_record(step: int, i: int, rollout: Rollout, completions: Completions, scores: Scores) -> dict[str, Any]:
    """One line of samples.jsonl: a completion with its prompt, gold answer, rewards and finish reason."""
    return {"step": step, "group": int(rollout.prompt_index[i]), "prompt": completions.prompts[i][-1]["content"],
            "completion": completions.completions[i], "answer": completions.answers[i],
            "reward": scores.total[i].item(), "rewards": {k: v[i].item() for k, v in scores.by_function.items()},
            "finish_reason": rollout.finish_reasons[i], "truncated": rollout.finish_reasons[i] == "length"}


def accuracy_summary(before: Any, last: dict[str, Any], eval_cfg: Any) -> dict[str, Any]:
    """Held-out accuracy before (an `Accuracy`, or None when not measured) and after training (the last
    metrics record), with its confidence interval and, for stepwise tasks, step accuracy."""
    out: dict[str, Any] = {}
    if before is not None:
        out["accuracy_before"] = before.accuracy
        if before.step_accuracy is not None:
            out["step_accuracy_before"] = before.step_accuracy
    out |= {"accuracy": last.get("eval_accuracy"),
            "accuracy_ci": [last.get("eval_accuracy_ci_low"), last.get("eval_accuracy_ci_high")]}
    if "eval_step_accuracy" in last:
        out["step_accuracy"] = last["eval_step_accuracy"]
    return out | {"eval_problems": eval_cfg.problems}
