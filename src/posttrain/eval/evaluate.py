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
    categories     per category of problem and for "all" (`headroom`): greedy and sampled accuracy, pass@k and the
                   share of problems whose samples disagree (0 < p < 1)
With `--data FILE` (`evaluate_data`) the problems are the rows of a user's verifiable file, scored with the rewards
a run uses (`heldout.CorrectRule` says which completions are correct), per value of its `category` column.
A reward model gets its held-out pairwise accuracy, margin and reward distribution (process reward
models: step accuracy and first-error detection), as `posttrain rm` measures them.

The held-out split of a built-in task is a property of each problem (a hash of its key), so these
problems cannot appear in any training set drawn from the task, whatever its size or seed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, PreTrainedTokenizerBase

from posttrain.config import load_config
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import Prepared, prepare_data
from posttrain.data.schemas import SPECS
from posttrain.data.tasks import TASKS, get_task
from posttrain.data.tasks.base import Example, Task
from posttrain.data.tokenize import Encoder
from posttrain.errors import ConfigError, PosttrainError, RunDirError
from posttrain.eval import heldout
from posttrain.eval.accuracy import Accuracy, EvalConfig, heldout_accuracy, heldout_problems, wilson_interval
from posttrain.eval.headroom import headroom, pass_at_k
from posttrain.eval.rewards import (
    RewardEvalConfig,
    comparison_metrics,
    comparison_scores,
    heldout_data_config,
    process_metrics,
)
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.models.adapters import AdapterConfig, apply_adapter
from posttrain.models.device import default_device
from posttrain.models.io import adapter_base, check_same_vocabulary, check_tokenizer_fits
from posttrain.models.precision import autocast, resolve_precision
from posttrain.models.reward import load_reward_model, saved_head
from posttrain.models.value import ACTOR_PREFIX
from posttrain.rewards.error_log import RewardErrorLog
from posttrain.rewards.functions import Completions, Scores, WeightedRewards
from posttrain.rollout import Rollout, make_engine
from posttrain.rollout.base import SamplingParams
from posttrain.train.checkpoint import COMPLETE, load_module_weights
from posttrain.train.metrics import finite_json, replace_text
from posttrain.train.run_dir import check_writable, finished_steps


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    task: str | None = None
    """Built-in task (None: the run's `eval.task`, else its data source when that is a built-in task, else arith)."""
    problems: int = 500
    samples: int = 8
    """Completions per problem at temperature 1 for pass@k, rewards and KL (0: greedy accuracy only)."""
    pass_k: tuple[int, ...] = (1, 8)
    rewards: tuple[str, ...] | None = None
    """Reward functions (names in `posttrain.rewards.functions.REWARD_FUNCTIONS`, or import paths), each of weight 1,
    averaged over the samples (None: correct and format on a built-in task; the run's reward.functions with
    `data`, else correct)."""
    data: str | None = None
    """A user's verifiable file (prompt rows; .jsonl/.json/.parquet/.csv or a `datasets` directory) evaluated
    instead of a built-in task, scored by the run's rewards (or `rewards`); its `category` column splits the
    headroom table."""
    correct_by: str | None = None
    """With `data`: the reward function whose score decides whether a completion is correct (None: `correct` when
    the rewards include it, else the weighted total; `heldout.CorrectRule`)."""
    threshold: float = 1.0
    """With `data`: a completion is correct when that score reaches this."""
    grader: str | None = None
    """The grader file (or shipped grader name) of the `grader` reward (None: the run's reward.grader)."""
    reference: str | None = None
    """Model directory KL is measured against (None: the run's starting model, when there is one)."""
    max_new_tokens: int | None = None
    batch_size: int = 64
    seed: int = 1234
    precision: str = "fp32"
    """auto | fp32 | bf16, as `train.precision`: every forward under bf16 autocast, or not."""
    out: str | None = None
    """The JSON file the results are written to (None: `write_result`'s name in the run's or the model's directory)."""
    data_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """`data:` settings over the run's (template, thinking): a bare model without a chat template needs
    template=plain."""
    reuse_recorded: bool = False
    """Take the greedy exact match of a run's final model from the run's own last evaluation when it measured the
    same problems the same way (`heldout.recorded_accuracy`), instead of decoding them again."""


@dataclasses.dataclass(frozen=True)
class Target:
    """What is evaluated: the model directory, and the run it came from (if any)."""

    model_dir: Path
    run_dir: Path | None
    run_config: dict[str, Any]
    # An RL checkpoint: model_dir holds the policy's tensors (with the critic's) for resuming, not an HF model; the
    # policy is rebuilt on the model the run started from (`load_policy`).
    actor_tensors: bool = False

    @property
    def is_reward_model(self) -> bool:
        """A scalar-head reward model (a sequence classifier), or a likelihood one (a causal LM marked so). A peft
        adapter directory is a causal LM's (`load_causal_lm` loads it over its base)."""
        if self.actor_tensors or adapter_base(self.model_dir) is not None:
            return False
        if saved_head(self.model_dir) == "likelihood":
            return True
        config = AutoConfig.from_pretrained(str(self.model_dir), local_files_only=True)
        return any(name.endswith("ForSequenceClassification") for name in config.architectures or ())

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.run_config.get(name) or {})


def resolve_target(path: str | Path) -> Target:
    """A run directory (its `final/`), a run's `final/`, a checkpoint (`checkpoints/step-N`, its `model/`), or any
    HF model directory."""
    path = Path(path)
    actor_tensors = False
    if not path.exists():
        kept = sorted((p.name for p in path.parent.glob("step-*") if (p / COMPLETE).is_file()),
                      key=lambda name: int(name[5:]) if name[5:].isdigit() else -1)
        raise RunDirError("no such directory" + (f" (the run's checkpoints: {', '.join(kept)})" if kept else ""),
                          file=str(path))
    if path.name == "model" and (path.parent / COMPLETE).is_file():  # a checkpoint's model/: the checkpoint
        path = path.parent
    final = path / "final"
    if (path / "config.yaml").is_file() and ((final / "config.json").is_file() or adapter_base(final) is not None):
        run_dir, model_dir = path, final  # a model, or an adapter (adapter.merge_on_save=false)
    elif (path / COMPLETE).is_file() and (path / "model").is_dir():  # a checkpoint, with the run's config
        run_dir, model_dir = path, path / "model"
        actor_tensors = not (model_dir / "config.json").is_file() and adapter_base(model_dir) is None
    elif (path / "config.json").is_file() or adapter_base(path) is not None:  # a model, or a peft adapter over one
        model_dir = path
        # A run's final/ reads its run's settings; a model that merely sits beside some config.yaml (a Hydra
        # project's) is a model of its own.
        run_dir = path.parent if path.name == "final" and (path.parent / "config.yaml").is_file() else None
    elif (path / "config.yaml").is_file():
        raise RunDirError("the run has no final model yet (no final/): finish or resume it first", file=str(path))
    else:
        raise RunDirError("neither a run directory (config.yaml + final/) nor a model directory (config.json)",
                          file=str(path))
    run_config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) if run_dir else {}
    if not isinstance(run_config or {}, dict):
        raise RunDirError("config.yaml is not a run's settings (a mapping)", file=str(run_dir / "config.yaml"))
    return Target(model_dir=model_dir, run_dir=run_dir, run_config=run_config or {}, actor_tensors=actor_tensors)


def evaluate(path: str | Path, options: EvalOptions, greedy: bool = True, write: bool = True) -> dict[str, Any]:
    """Evaluate the model at `path`, written to `<run>/eval.json` (or `<model>/eval.json`; `write_result`) unless
    `write` is off.

    greedy=False skips the greedy accuracy (a recipe that just measured it): samples only.
    """
    if options.data in TASKS and not Path(options.data).exists():  # it read the task's training rows as a file's
        raise ConfigError(f"{options.data!r} is a built-in task, not a file: --task {options.data} scores the model on "
                          "its held-out problems", field="--data")
    target = resolve_target(path)
    if write:
        check_writable(out_path(target, options).parent, "name a writable file with --out")
    if options.data is not None and not target.is_reward_model:
        return evaluate_data(target, options, write)
    task = get_task(_task_name(target, options))
    data = _data_config(target, task, options)
    precision = eval_precision(options)
    with autocast(precision, default_device()):
        if target.is_reward_model:
            result = evaluate_reward_model(target, data, options)
        else:
            result = evaluate_policy(target, task, data, options, greedy)
    # A reward model scored on rows of its own or of a file: no task to name.
    named = {"task": task.name} if not target.is_reward_model or result.get("data") in TASKS else {}
    result = {"model": str(target.model_dir), **named, "precision": precision, **result}
    if write:
        write_result(target, result, options)
    return result


def eval_precision(options: EvalOptions) -> str:
    """The precision the forwards run in: `options.precision` resolved for this device (auto: bf16 where native)."""
    try:
        return resolve_precision(options.precision, default_device())[0]
    except ValueError as err:
        raise ConfigError(str(err), field="precision") from None


def write_result(target: Target, result: dict[str, Any], options: EvalOptions) -> None:
    """`options.out`, else `eval.json` of the run (or model) for a built-in task and `eval-<file name>.json` for a
    data file: an evaluation of one file no longer replaces that of the task or of another file. Atomic: an
    interrupted write leaves the last one whole."""
    out = out_path(target, options)
    out.parent.mkdir(parents=True, exist_ok=True)  # --out results/mine.json: its directory is made
    replace_text(out, finite_json(result, indent=2))


def out_path(target: Target, options: EvalOptions) -> Path:
    if options.out:
        return Path(options.out)
    name = "eval.json" if options.data is None else f"eval-{Path(options.data).stem}.json"
    return (target.run_dir or target.model_dir) / name


def _task_name(target: Target, options: EvalOptions) -> str:
    if options.task:
        return options.task
    source = target.section("data").get("source")
    return target.section("eval").get("task") or (source if source in TASKS else None) or "arith"


def _data_config(target: Target, task: Task, options: EvalOptions) -> DataConfig:
    """The run's `data:` settings (chat template, thinking switch), so prompts render as in training, under
    `options.data_settings`."""
    data = target.section("data")
    source = f"{target.run_dir / 'config.yaml'}: data" if target.run_dir else "data"
    try:
        return load_config(DataConfig, {**data, **options.data_settings, "source": task.name})
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def evaluate_policy(target: Target, task: Task, data: DataConfig, options: EvalOptions,
                    greedy: bool = True) -> dict[str, Any]:
    examples = heldout_problems(task, options.problems, options.seed, field="--problems")  # drawn before loading
    tokenizer, model = load_policy(target)
    model.eval()
    run_eval = target.section("eval")
    max_new_tokens = options.max_new_tokens or int(run_eval.get("max_new_tokens", EvalConfig.max_new_tokens))
    result: dict[str, Any] = {"kind": "policy"}
    accuracy = None
    if greedy:
        config = EvalConfig(task=task.name, problems=options.problems, seed=options.seed,
                            max_new_tokens=max_new_tokens, batch_size=options.batch_size, samples=0)
        accuracy = (_recorded_accuracy(target, config) if options.reuse_recorded else None) or heldout_accuracy(
            model, tokenizer, data, config)
        result |= {"problems": accuracy.problems, "accuracy": accuracy.accuracy,
                   "accuracy_ci": [accuracy.ci_low, accuracy.ci_high],
                   "completion_length": accuracy.completion_length,
                   **({"step_accuracy": accuracy.step_accuracy} if accuracy.step_accuracy is not None else {})}
    if options.samples:
        reference = _reference(target, options, tokenizer)
        run_reward = target.section("reward")  # for --reward reward_model and --reward grader: the run's own
        reward_model = in_workdir(target, run_reward.get("model_path"))
        grader = options.grader or in_workdir(target, run_reward.get("grader"))
        sampled, counts = sampled_metrics(model, tokenizer, task, examples, data, options, max_new_tokens,
                                          reference, reward_model, grader)
        categories = [task.category(e) for e in examples]
        table = headroom(categories, counts, options.samples, sampled_ks(options),
                         accuracy.correct if accuracy is not None else None)
        result |= sampled | {"sampled_accuracy": table["all"]["sampled_accuracy"], "categories": table,
                             **_intermediate_share(table)}
        # Per problem (in the order of the held-out draw): what paired comparisons of two models need.
        result["per_problem"] = {"correct_samples": counts, "category": categories,
                                 **({"greedy": [int(c) for c in accuracy.correct]} if accuracy is not None else {}),
                                 **({"steps_right": list(accuracy.steps_right)}
                                    if accuracy is not None and accuracy.steps_right else {})}
    return result


def load_policy(target: Target) -> tuple[PreTrainedTokenizerBase, torch.nn.Module]:
    """The tokenizer and causal LM to evaluate: the target's, or for an RL checkpoint those of the model the run
    started from (`model.path` of the run's config), its policy's tensors loaded into the model (with the run's
    adapter on it, merged, where the run trained one)."""
    if not target.actor_tensors:
        tokenizer, policy = load_tokenizer(target.model_dir), load_causal_lm(target.model_dir)
        check_tokenizer_fits(tokenizer, policy, "path")
        return tokenizer, policy
    start = in_workdir(target, target.section("model").get("path"))  # relative to where the run was started
    if not start:
        raise RunDirError("this RL checkpoint holds the policy as a change of the model the run started from, and "
                          "the run's config names none (model.path): evaluate the run's final/ (or resume the run)",
                          file=str(target.run_dir))
    try:
        tokenizer, policy = load_tokenizer(start), load_causal_lm(start)
        check_tokenizer_fits(tokenizer, policy)
        adapter = load_config(AdapterConfig, target.section("adapter"))
        policy = apply_adapter(policy, adapter)  # (method none: the model itself)
        load_module_weights(policy, target.model_dir, prefix=ACTOR_PREFIX)
        return tokenizer, policy.merge_and_unload() if adapter.method == "lora" else policy
    except (RuntimeError, OSError, PosttrainError) as err:
        raise RunDirError(f"its policy is rebuilt on the model the run started from, {start}, which failed: {err}",
                          file=str(target.run_dir)) from None


def _recorded_accuracy(target: Target, config: EvalConfig) -> Accuracy | None:
    """The run's own evaluation of its final model (its last step) on `config`'s problems, in the precision the
    forwards run in now, or None."""
    if target.run_dir is None or target.model_dir.resolve() != (target.run_dir / "final").resolve():
        return None
    steps = finished_steps(target.run_dir)
    if steps is None:
        return None
    return heldout.recorded_accuracy(target.run_dir, steps, config.task, config, heldout.current_precision())


def sampled_ks(options: EvalOptions) -> list[int]:
    return [k for k in options.pass_k if k <= options.samples]


def _reference(target: Target, options: EvalOptions, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module | None:
    """The KL reference: `--reference`, else the model the run started from; it must read the policy's token ids as
    the policy does (`tokenizer`: a KL between two vocabularies is no number)."""
    path = options.reference or in_workdir(target, target.section("model").get("path"))
    if not path:
        return None
    field = "--reference" if options.reference else "model.path"
    if not (Path(path) / "config.json").is_file():
        raise ConfigError("the KL reference is not a model directory (pass --reference)", file=str(path),
                          field=field)
    check_same_vocabulary(tokenizer, path, field, remedy="Compare with a model of the policy's tokenizer (the model "
                                                         "it was trained from)")
    return load_causal_lm(path).eval()


"""The KL reference's padding-free rows: samples packed into rows of about this many tokens (attention costs a
row's length times its tokens)."""


@torch.no_grad()
def sampled_metrics(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, examples: list[Example],
                    data: DataConfig, options: EvalOptions, max_new_tokens: int,
                    reference: torch.nn.Module | None, reward_model_path: str | None = None,
                    grader_path: str | None = None) -> tuple[dict[str, Any], list[int]]:
    """pass@k, mean rewards and KL to `reference` from `options.samples` samples per problem of `examples` (the
    held-out draw, `heldout_problems`) at temperature 1, and the correct samples of each problem, in that order;
    `reward_model_path` the run's reward model, for a `reward_model` among the rewards, `grader_path` (--grader or
    the run's) for a `grader`."""
    ks = sampled_ks(options)
    encoder = Encoder.from_config(tokenizer, data)
    try:
        rewards = WeightedRewards.from_config({name: 1.0 for name in task_rewards(options)}, task=task,
                                              reward_model_path=reward_model_path, grader_path=grader_path)
    except ValueError as err:  # an unknown name or an import path that does not import: the user's --reward
        raise ConfigError(str(err), field="--reward") from None
    engine = make_engine("local", model, tokenizer)
    n = options.samples
    correct: list[int] = []
    reward_sums = dict.fromkeys(task_rewards(options), 0.0)
    kl_total = 0.0
    per_call = max(1, options.batch_size // n)
    for start in range(0, len(examples), per_call):
        chunk = examples[start:start + per_call]
        prompts = [encoder.encode_prompt(_messages(e)) for e in chunk]
        rollout = engine.generate(prompts, SamplingParams(  # each problem's samples the same at any batch size
            max_new_tokens=max_new_tokens, temperature=1.0, n=n,
            prompt_seeds=tuple(range(options.seed + start, options.seed + start + len(chunk)))))
        rows = [chunk[i] for i in rollout.prompt_index.tolist()]
        scores = rewards(_completions(rows, rollout.texts))
        for name, values in scores.by_function.items():  # a grader's (the reward model's) parts and errors too
            reward_sums[name] = reward_sums.get(name, 0.0) + values.sum().item()
        hits = torch.tensor([task.verify(t, e.answer) for t, e in zip(rollout.texts, rows, strict=True)])
        correct += hits.view(len(chunk), n).sum(dim=1).int().tolist()
        if reference is not None:
            kl_total += heldout.sampled_kl_sum(reference, rollout)
    samples = len(examples) * n
    result: dict[str, Any] = {"samples_per_problem": n}
    result |= {f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in ks}
    result |= {f"reward_{name}": total / samples for name, total in reward_sums.items()}
    if reference is not None:
        result["kl"] = kl_total / samples
    return result, correct


def task_rewards(options: EvalOptions) -> tuple[str, ...]:
    """The reward functions averaged over a built-in task's samples."""
    return options.rewards or ("correct", "format")


def _messages(example: Example) -> list[dict[str, Any]]:
    return [{"role": "user", "content": example.prompt}]


def _completions(examples: list[Example], texts: list[str]) -> Completions:
    return Completions(prompts=[_messages(e) for e in examples], completions=list(texts),
                       answers=[e.answer for e in examples], steps=[list(e.steps) for e in examples])


def evaluate_reward_model(target: Target, data: DataConfig, options: EvalOptions) -> dict[str, Any]:
    """Pairwise accuracy (or step accuracy) on the user's own comparisons (--data: preference or ranking rows,
    stepwise ones for a process reward model; the first --problems of them), or a named --task's held-out pairs, or
    else the held-out comparisons the run itself held out: data.eval_split's rows of its training data, else its
    eval.source, else the held-out split of `data`'s task (a bare model)."""
    tokenizer = load_tokenizer(target.model_dir)
    model = load_reward_model(target.model_dir)
    check_tokenizer_fits(tokenizer, model, "path")
    process_target = getattr(model.config, "process_target", None)
    held = RewardEvalConfig(size=options.problems, seed=options.seed, batch_size=options.batch_size)
    if options.data is not None:
        own = dataclasses.replace(data, source=options.data, eval_split=0.0, format="auto")
        heldout_cfg = heldout_data_config(own, dataclasses.replace(held, source=options.data, split=own.split))
        heldout_cfg = dataclasses.replace(heldout_cfg, limit=options.problems)
    elif options.task:  # named: its held-out pairs, even for a run that held out rows of its own (it was ignored)
        heldout_cfg = heldout_data_config(dataclasses.replace(data, eval_split=0.0), held)
    else:
        heldout_cfg = _run_heldout_config(target, held)
        source = target.section("data").get("source")
        if heldout_cfg is None and source is not None and source not in TASKS and not target.section("eval").get(
                "task"):
            # A built-in task's pairs would be scored and reported as if they said something of the run's own rows.
            raise ConfigError(f"the run trained on its own rows ({source}) and held none of them out "
                              "(data.eval_split, eval.source): --data scores it on a file of comparisons, --task on a "
                              "built-in task's held-out pairs", field="--task")
        heldout_cfg = heldout_cfg or heldout_data_config(data, held)
    assert heldout_cfg is not None  # data.source is a built-in task
    accepts = STAGE_FORMATS["prm" if process_target else "rm"]
    if process_target:
        heldout_cfg = dataclasses.replace(heldout_cfg, format="stepwise")
    rows = prepare_data(heldout_cfg, tokenizer, accepts=accepts, mask_dtype=model.dtype,
                        heldout=heldout_cfg.eval_split > 0)
    where = {"data": heldout_cfg.source} | ({"eval_split": heldout_cfg.eval_split} if heldout_cfg.eval_split else {})
    if process_target:
        metrics = process_metrics(model, rows, options.batch_size, process_target, prefix="")
        return {"kind": "process_reward_model", **where, "rows": len(rows.dataset), **metrics}
    metrics = comparison_metrics(comparison_scores(model, rows, options.batch_size), prefix="")
    return {"kind": "reward_model", **where, "rows": len(rows.dataset), **metrics}


def _run_heldout_config(target: Target, held: RewardEvalConfig) -> DataConfig | None:
    """The held-out rows of a run that held some out of its own data (data.eval_split, or eval.source), read as the
    run read them (relative paths from where it was started); None for a bare model or a run that held none out."""
    if target.run_dir is None:
        return None
    data, run_eval = target.section("data"), target.section("eval")
    if not data.get("eval_split") and not isinstance(run_eval.get("source"), str):
        return None
    source = data.get("source", DataConfig.source)
    data = {**data, "source": source if source in TASKS else in_workdir(target, source)}
    try:
        run_data = load_config(DataConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{target.run_dir / 'config.yaml'}: data: {err}") from None
    if run_eval.get("source"):
        held = dataclasses.replace(held, source=in_workdir(target, run_eval["source"]),
                                   split=run_eval.get("split", held.split))
    return heldout_data_config(run_data, held)


# ----------------------------------------------------------------------------------------------
# A user's own verifiable file (`posttrain eval <model> --data FILE`).


def evaluate_data(target: Target, options: EvalOptions, write: bool = True) -> dict[str, Any]:
    """Greedy and sampled completions of the prompt rows of `options.data`, scored with the rewards a run uses
    (its reward.functions, reward.task, reward.model_path and reward.grader; or --reward/--task/--grader),
    a completion counting as correct by `heldout.CorrectRule`: greedy accuracy (95% Wilson interval), sampled
    accuracy at T=1, pass@k, the share of rows whose samples disagree, per `category` and for "all"
    (`headroom`), the mean of every reward over the samples, and per-row results for paired comparisons."""
    if options.data is None:
        raise ValueError("evaluate_data needs options.data")
    precision = eval_precision(options)
    tokenizer, model = load_policy(target)
    model.eval()
    rows = prepare_data(_user_data_config(target, options.data, options), tokenizer, accepts=("verifiable",),
                        mask_dtype=model.dtype)
    _refuse_comparisons(rows, options.data)
    functions, rewards = _user_rewards(target, options, rows)
    # Errors as in a run: the first of each kind printed, a batch mostly of errors stops the evaluation (its
    # accuracy would be of zeros), and their count is in the result.
    errors = rewards.error_log = RewardErrorLog(
        None, float(target.section("reward").get("max_error_fraction", 0.5)),
        setting="--reward" if options.rewards else "reward.functions", unkept="posttrain eval keeps no error file")
    rule = heldout.CorrectRule(by=options.correct_by, threshold=options.threshold)
    rule.check(functions, "--correct-by")
    count = min(options.problems, len(rows.dataset))
    categories = heldout.row_categories(rows)[:count]
    max_new_tokens = options.max_new_tokens or int(target.section("sampling").get("max_new_tokens") or target.section(
        "eval").get("max_new_tokens") or EvalConfig.max_new_tokens)

    def score(rollout: Rollout, batch: list[dict[str, Any]]) -> Scores:
        return rewards(heldout.completions_of(rollout, batch))

    with autocast(precision, default_device()):
        greedy = heldout.greedy_scores(model, tokenizer, rows, score, max_new_tokens, count, options.batch_size, 0)
        greedy_correct = rule.mask(greedy.scores).tolist()
        sampled = (heldout.sampled_scores(model, tokenizer, rows, score, options.samples, max_new_tokens, count,
                                          options.batch_size, options.seed, rule,
                                          reference=_reference(target, options, tokenizer))
                   if options.samples else None)
    hits = int(sum(greedy_correct))
    low, high = wilson_interval(hits, count)
    result: dict[str, Any] = {
        "model": str(target.model_dir), "data": options.data, "precision": precision, "kind": "policy",
        "rewards": functions, "correct_if": rule.describe(functions), "problems": count,
        "rows_dropped": rows.tokenized.stats.dropped_too_long, "accuracy": hits / count, "accuracy_ci": [low, high],
        "greedy_reward": greedy.scores.total.mean().item(), "completion_length": greedy.completion_length,
        "truncated": greedy.truncated, "reward_errors": len(errors.pending)}
    per_problem: dict[str, Any] = {"line": list(rows.dataset["line"][:count]), "category": categories,
                                   "greedy": [int(c) for c in greedy_correct]}
    if sampled is not None:
        table = headroom(categories, sampled.correct, sampled.n, sampled_ks(options), tuple(greedy_correct))
        result |= {"samples_per_problem": sampled.n,
                   **{key: value for key, value in table["all"].items() if key.startswith("pass@")},
                   **{f"reward_{name}": value for name, value in sampled.rewards.items()},
                   "sampled_accuracy": table["all"]["sampled_accuracy"], "categories": table,
                   **_intermediate_share(table), **({"kl": sampled.kl} if sampled.kl is not None else {})}
        per_problem["correct_samples"] = sampled.correct
    else:
        result["categories"] = headroom(categories, [0] * count, 0, [], tuple(greedy_correct))
    result["per_problem"] = per_problem
    if write:
        write_result(target, result, options)
    return result


def _refuse_comparisons(rows: Prepared, source: str) -> None:
    """A file of comparisons or labelled answers, which a prompt column lets pass for prompt rows: its chosen and
    rejected answers would be extra columns and the policy's own completions scored (with a `correct` reward that
    has no gold answer to check). Refused, naming what the rows are and what measures a model on them."""
    columns = list(json.loads(rows.dataset[0]["row"])) if len(rows.dataset) else []
    found = next((fmt for fmt in ("preference", "ranking", "unpaired", "stepwise")
                  if all(c in columns for c in SPECS[fmt].required)), None)
    if found is not None:
        raise ConfigError(f"{source} holds {found} rows ({', '.join(SPECS[found].required)}): --data scores a "
                          "policy's own completions of prompt rows (prompt, optional answer). A reward model is "
                          "scored on such rows by posttrain eval <reward model> --data, and a DPO or KTO run's model "
                          "(its loss and reward accuracy against its reference) by posttrain eval <that run> --data",
                          field="--data")


def _user_data_config(target: Target, source: str, options: EvalOptions) -> DataConfig:
    """The run's `data:` settings (template, thinking switch, column renames, max_length), so that the file's
    prompts render as in training, under `options.data_settings`, reading every row of `source` as verifiable
    prompt rows."""
    data = {key: value for key, value in target.section("data").items()
            if key not in ("source", "format", "eval_split", "limit", "batch_mode")}
    where = f"{target.run_dir / 'config.yaml'}: data" if target.run_dir else "data"
    try:
        return load_config(DataConfig, {**data, **options.data_settings, "source": source, "format": "verifiable"})
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _user_rewards(target: Target, options: EvalOptions, rows: Prepared) -> tuple[dict[str, float], WeightedRewards]:
    """The reward functions with their weights, built as the run built them: --reward names (weight 1) or the
    run's reward.functions (else `correct`), with --task or the run's reward.task (else its data source when that
    is a built-in task) verifying answers, and --grader or the run's reward.grader; checked against the rows."""
    run_reward = target.section("reward")
    functions = ({name: 1.0 for name in options.rewards} if options.rewards
                 else {str(k): float(v) for k, v in (run_reward.get("functions") or {"correct": 1.0}).items()})
    source = target.section("data").get("source")
    task_name = options.task or run_reward.get("task") or (source if source in TASKS else None)
    task = get_task(task_name) if task_name else None
    field = "--reward" if options.rewards else ("reward.functions" if run_reward.get("functions") else "--reward")
    # The run's own files (`my_rewards.py:fn`, its grader) are named relative to where it was started; --reward
    # and --grader relative to here.
    built = functions if options.rewards else {_function_in_workdir(target, name): w for name, w in functions.items()}
    try:
        grader = options.grader or in_workdir(target, run_reward.get("grader"))
        rewards = WeightedRewards.from_config(built, task=task, grader_path=grader,
                                              reward_model_path=in_workdir(target, run_reward.get("model_path")),
                                              timeout_s=run_reward.get("timeout_s"),
                                              in_process=bool(run_reward.get("in_process", False)))
        rewards.functions = dict(zip(functions, rewards.functions.values(), strict=True))  # named as the run did
    except ValueError as err:
        hint = (" (--task names the built-in task whose answer check compares a completion with the `answer` "
                "column; --reward a grader or your own function instead)") if "needs a task" in str(err) else ""
        raise ConfigError(f"{err}{hint}", field="--task" if hint else field) from None
    heldout.check_gold_answers(rows.dataset, rows.tokenized.name, functions, task=task)
    rewards.check_grader_rows(rows.dataset)
    return functions, rewards


def in_workdir(target: Target, path: str | None) -> str | None:
    """A relative path of the run's config as the run meant it: under the directory it was started in (run.workdir)
    where that holds it, else as given (relative to here)."""
    workdir = target.section("run").get("workdir")
    if not path or not workdir or Path(path).is_absolute():
        return path
    return str(Path(workdir) / path) if (Path(workdir) / path).exists() else path


def _function_in_workdir(target: Target, name: str) -> str:
    """A reward function of the run's config (`path/to/file.py:fn`) with its file found as `_in_workdir` finds it."""
    module, _, function = name.rpartition(":")
    if not module.endswith(".py"):
        return name  # a registered name or an importable module: found the same way from anywhere
    return f"{in_workdir(target, module)}:{function}"


def _intermediate_share(table: dict[str, dict[str, float]]) -> dict[str, float]:
    """The overall share of problems whose samples disagree, where there is one (not with one sample per problem)."""
    share = table["all"].get("intermediate_share")
    return {} if share is None else {"intermediate_share": share}
