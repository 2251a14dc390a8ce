"""`posttrain eval <run-dir or model-dir>`: one model's held-out numbers, on problems training never saw.

A policy (causal LM) gets
    accuracy       greedy exact match on `problems` distinct held-out problems, with a 95% Wilson interval
    pass@k         at temperature 1 from n samples per problem: 1 - C(n - c, k) / C(n, k) averaged over
                   problems (c correct samples; the unbiased estimator of Chen et al. 2021)
    reward_<name>  mean of each reward function (graders included) over those samples
    kl             KL(policy || reference) per completion, estimated on the samples as
                   E_y~policy[ sum_t log pi(y_t) - log ref(y_t) ] (k1: unbiased for the sequence KL);
                   the reference defaults to the model the run started from (the SFT model in the demo)
    completion_length  mean tokens of the greedy completions
A reward model gets its held-out pairwise accuracy, margin and reward distribution (process reward
models: step accuracy and first-error detection), as `posttrain rm` measures them.

The held-out split of a built-in task is a property of each problem (a hash of its key), so these
problems cannot appear in any training set drawn from the task, whatever its size or seed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, PreTrainedTokenizerBase

from posttrain.config import load_config
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import prepare_data
from posttrain.data.tasks import TASKS, get_task
from posttrain.data.tasks.base import Example, Task
from posttrain.data.tokenize import Encoder
from posttrain.errors import ConfigError, RunDirError
from posttrain.eval.accuracy import EvalConfig, heldout_accuracy, heldout_problems
from posttrain.eval.headroom import headroom, pass_at_k
from posttrain.eval.rewards import (
    RewardEvalConfig,
    comparison_metrics,
    comparison_scores,
    heldout_data_config,
    process_metrics,
)
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.models.precision import autocast, resolve_precision
from posttrain.models.reward import load_reward_model
from posttrain.rewards.functions import Completions, WeightedRewards
from posttrain.rollout import make_engine
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.recompute import policy_logprobs


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    task: str | None = None
    """Built-in task (None: the run's `eval.task`, else its data source when that is a built-in task, else arith)."""
    problems: int = 500
    samples: int = 8
    """Completions per problem at temperature 1 for pass@k, rewards and KL (0: greedy accuracy only)."""
    pass_k: tuple[int, ...] = (1, 8)
    rewards: tuple[str, ...] = ("correct", "format")
    """Reward functions (names in `posttrain.rewards.functions.REWARD_FUNCTIONS`) averaged over the samples."""
    reference: str | None = None
    """Model directory KL is measured against (None: the run's starting model, when there is one)."""
    max_new_tokens: int | None = None
    batch_size: int = 64
    seed: int = 1234
    precision: str = "fp32"
    """auto | fp32 | bf16, as `train.precision`: every forward under bf16 autocast, or not."""


@dataclasses.dataclass(frozen=True)
class Target:
    """What is evaluated: the model directory, and the run it came from (if any)."""

    model_dir: Path
    run_dir: Path | None
    run_config: dict[str, Any]

    @property
    def is_reward_model(self) -> bool:
        config = AutoConfig.from_pretrained(str(self.model_dir), local_files_only=True)
        return any(name.endswith("ForSequenceClassification") for name in config.architectures or ())

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.run_config.get(name) or {})


def resolve_target(path: str | Path) -> Target:
    """A run directory (its `final/`), a run's `final/`, or any HF model directory."""
    path = Path(path)
    if (path / "config.yaml").is_file() and (path / "final" / "config.json").is_file():
        run_dir, model_dir = path, path / "final"
    elif (path / "config.json").is_file():
        model_dir = path
        run_dir = path.parent if (path.parent / "config.yaml").is_file() else None
    elif (path / "config.yaml").is_file():
        raise RunDirError("the run has no final model yet (no final/): finish or resume it first", file=str(path))
    else:
        raise RunDirError("neither a run directory (config.yaml + final/) nor a model directory (config.json)",
                          file=str(path))
    run_config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) if run_dir else {}
    return Target(model_dir=model_dir, run_dir=run_dir, run_config=run_config or {})


def evaluate(path: str | Path, options: EvalOptions, greedy: bool = True, write: bool = True) -> dict[str, Any]:
    """Evaluate the model at `path`, written to `<run>/eval.json` (or `<model>/eval.json`) unless `write` is off.

    greedy=False skips the greedy accuracy (a recipe that just measured it): samples only.
    """
    target = resolve_target(path)
    task = get_task(_task_name(target, options))
    data = _data_config(target, task)
    try:
        precision, _ = resolve_precision(options.precision)
    except ValueError as err:
        raise ConfigError(str(err), field="precision") from None
    with autocast(precision):
        if target.is_reward_model:
            result = evaluate_reward_model(target, data, options)
        else:
            result = evaluate_policy(target, task, data, options, greedy)
    result = {"model": str(target.model_dir), "task": task.name, "precision": precision, **result}
    if write:
        out = (target.run_dir or target.model_dir) / "eval.json"
        out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def _task_name(target: Target, options: EvalOptions) -> str:
    if options.task:
        return options.task
    source = target.section("data").get("source")
    return target.section("eval").get("task") or (source if source in TASKS else None) or "arith"


def _data_config(target: Target, task: Task) -> DataConfig:
    """The run's `data:` settings (chat template, thinking switch), so prompts render as in training."""
    data = target.section("data")
    source = f"{target.run_dir / 'config.yaml'}: data" if target.run_dir else "data"
    try:
        return load_config(DataConfig, {**data, "source": task.name})
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def evaluate_policy(target: Target, task: Task, data: DataConfig, options: EvalOptions,
                    greedy: bool = True) -> dict[str, Any]:
    tokenizer = load_tokenizer(target.model_dir)
    model = load_causal_lm(target.model_dir).eval()
    run_eval = target.section("eval")
    max_new_tokens = options.max_new_tokens or int(run_eval.get("max_new_tokens", EvalConfig.max_new_tokens))
    result: dict[str, Any] = {"kind": "policy"}
    accuracy = None
    if greedy:
        accuracy = heldout_accuracy(model, tokenizer, data, EvalConfig(
            task=task.name, problems=options.problems, seed=options.seed, max_new_tokens=max_new_tokens,
            batch_size=options.batch_size, samples=0))
        result |= {"problems": accuracy.problems, "accuracy": accuracy.accuracy,
                   "accuracy_ci": [accuracy.ci_low, accuracy.ci_high],
                   "completion_length": accuracy.completion_length,
                   **({"step_accuracy": accuracy.step_accuracy} if accuracy.step_accuracy is not None else {})}
    if options.samples:
        reference = _reference(target, options)
        sampled, counts = sampled_metrics(model, tokenizer, task, data, options, max_new_tokens, reference)
        examples = heldout_problems(task, options.problems, options.seed)
        table = headroom([task.category(e) for e in examples], counts, options.samples, sampled_ks(options),
                         accuracy.correct if accuracy is not None else None)
        result |= sampled | {"sampled_accuracy": table["all"]["sampled_accuracy"],
                             "intermediate_share": table["all"]["intermediate_share"], "categories": table}
        # Per problem (in the order of the held-out draw): what paired comparisons of two models need.
        result["per_problem"] = {"correct_samples": counts,
                                 **({"greedy": [int(c) for c in accuracy.correct]} if accuracy is not None else {})}
    return result


def sampled_ks(options: EvalOptions) -> list[int]:
    return [k for k in options.pass_k if k <= options.samples]


def _reference(target: Target, options: EvalOptions) -> torch.nn.Module | None:
    path = options.reference or target.section("model").get("path")
    if not path:
        return None
    if not (Path(path) / "config.json").is_file():
        raise ConfigError("the KL reference is not a model directory (pass --reference)", file=str(path),
                          field="model.path")
    return load_causal_lm(path).eval()


@torch.no_grad()
def sampled_metrics(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, data: DataConfig,
                    options: EvalOptions, max_new_tokens: int,
                    reference: torch.nn.Module | None) -> tuple[dict[str, Any], list[int]]:
    """pass@k, mean rewards and KL to `reference` from `options.samples` samples per problem at temperature 1,
    and the correct samples of each problem (in the order of `heldout_problems`)."""
    ks = sampled_ks(options)
    examples = heldout_problems(task, options.problems, options.seed)
    encoder = Encoder.from_config(tokenizer, data)
    try:
        rewards = WeightedRewards.from_config({name: 1.0 for name in options.rewards}, task=task)
    except ValueError as err:  # an unknown name or an import path that does not import: the user's --reward
        raise ConfigError(str(err), field="--reward") from None
    engine = make_engine("local", model, tokenizer)
    n = options.samples
    correct: list[int] = []
    reward_sums = dict.fromkeys(options.rewards, 0.0)
    kl_total = 0.0
    per_call = max(1, options.batch_size // n)
    for start in range(0, len(examples), per_call):
        chunk = examples[start:start + per_call]
        prompts = [encoder.encode_prompt(_messages(e)) for e in chunk]
        rollout = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=n,
                                                          seed=options.seed + start))
        rows = [chunk[i] for i in rollout.prompt_index.tolist()]
        scores = rewards(_completions(rows, rollout.texts))
        for name, values in scores.by_function.items():
            reward_sums[name] += values.sum().item()
        hits = torch.tensor([task.verify(t, e.answer) for t, e in zip(rollout.texts, rows, strict=True)])
        correct += hits.view(len(chunk), n).sum(dim=1).int().tolist()
        if reference is not None:
            ref = policy_logprobs(reference, rollout, 1.0)
            kl_total += ((rollout.logprobs - ref) * rollout.response_mask).sum().item()
    samples = len(examples) * n
    result: dict[str, Any] = {"samples_per_problem": n}
    result |= {f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in ks}
    result |= {f"reward_{name}": total / samples for name, total in reward_sums.items()}
    if reference is not None:
        result["kl"] = kl_total / samples
    return result, correct


def _messages(example: Example) -> list[dict[str, Any]]:
    return [{"role": "user", "content": example.prompt}]


def _completions(examples: list[Example], texts: list[str]) -> Completions:
    return Completions(prompts=[_messages(e) for e in examples], completions=list(texts),
                       answers=[e.answer for e in examples], steps=[list(e.steps) for e in examples])


def evaluate_reward_model(target: Target, data: DataConfig, options: EvalOptions) -> dict[str, Any]:
    tokenizer = load_tokenizer(target.model_dir)
    model = load_reward_model(target.model_dir)
    process_target = getattr(model.config, "process_target", None)
    heldout_cfg = heldout_data_config(data, RewardEvalConfig(size=options.problems, seed=options.seed,
                                                             batch_size=options.batch_size))
    assert heldout_cfg is not None  # data.source is a built-in task
    accepts = STAGE_FORMATS["prm" if process_target else "rm"]
    if process_target:
        heldout_cfg = dataclasses.replace(heldout_cfg, format="stepwise")
    heldout = prepare_data(heldout_cfg, tokenizer, accepts=accepts, mask_dtype=model.dtype)
    if process_target:
        metrics = process_metrics(model, heldout, options.batch_size, process_target, prefix="")
        return {"kind": "process_reward_model", "rows": len(heldout.dataset), **metrics}
    metrics = comparison_metrics(comparison_scores(model, heldout, options.batch_size), prefix="")
    return {"kind": "reward_model", "rows": len(heldout.dataset), **metrics}
