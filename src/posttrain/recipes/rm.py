"""Reward modelling: a scalar score per response, trained on comparisons (or, kind=process, per step).

    pairs:     loss = -log sigmoid(r_chosen - r_rejected - margin)          (Bradley–Terry)
    soft:      loss = BCE(sigmoid(r_chosen - r_rejected), preference_prob)  (several labelers' verdict)
    rankings:  loss = -sum_k [r_k - logsumexp_{j >= k} r_j]                 (Plackett–Luce, ragged K;
               tied responses: Breslow's approximation, see algos.plackett_luce_loss)
    + center_rewards * (sum of a comparison's rewards)^2                     (optional: pins the free offset)
    process:   loss = BCE(sigmoid(r_step), label) or (r_step - label)^2, read at each step's separator

The comparisons are the data's (`pairs.source=data`), or pairs of the starting model's own samples
(`pairs.source=on_policy`): the data's verifiable rows are prompts, the SFT model samples
`sampling.samples_per_prompt` completions of each, `reward` scores them (the task verifier: correct or not),
and a prompt's best- and worst-scored completions make a pair — the completions a reward model judges in
RLHF. Held-out pairs are sampled the same way from held-out prompts; the data source's own held-out
comparisons are scored too (`eval_offline_*`), so the two accuracies are reported side by side.

The model is the SFT checkpoint's trunk with a scalar head (`posttrain.models.reward`), scored at
the last real token, or (head=likelihood) the SFT model itself, whose reward is its scaled log-likelihood of
the response; every response of a micro-batch goes through one forward. Full training by
default; `freeze_backbone` trains the head only, LoRA trains adapters plus the head. Losses are
means over comparisons (steps for a process model) scaled to the whole step's count, so
micro-batching does not change the gradient. The held-out evaluation — pairwise accuracy, margin and
reward distribution, or step accuracy and first-error detection — runs on problems training never
saw. The final model loads with `AutoModelForSequenceClassification` (MLP head: `load_reward_model`)
and scores through `posttrain.rewards.RewardModelScorer` / `ProcessRewardScorer`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from posttrain.algos import (
    PROCESS_TARGETS,
    bradley_terry_loss,
    plackett_luce_loss,
    process_reward_loss,
    reward_centering_penalty,
)
from posttrain.config import ModelConfig, OptimConfig, RunConfig, param, section
from posttrain.data.columns import row_lengths
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import Prepared, prepare_data
from posttrain.data.tasks import TASKS
from posttrain.errors import ConfigError, DataError
from posttrain.eval.heldout import Evaluation
from posttrain.eval.heldout import loss_part as heldout_loss_part
from posttrain.eval.report import write_training_report
from posttrain.eval.rewards import (
    RewardEvalConfig,
    ScoredComparison,
    comparison_metrics,
    comparison_scores,
    good_steps,
    heldout_data_config,
    plot_reward_distribution,
    process_metrics,
)
from posttrain.models import count_parameters, load_tokenizer, load_tokenizer_and_model
from posttrain.models.adapters import AdapterConfig, apply_adapter, save_trained
from posttrain.models.io import check_tokenizer_fits
from posttrain.models.reward import (
    LIKELIHOOD_REDUCTIONS,
    REWARD_HEADS,
    build_reward_model,
    freeze_backbone,
    scores_at,
    sequence_scores,
)
from posttrain.recipes.layout import batches_for
from posttrain.recipes.rl import (
    RewardConfig,
    SamplingConfig,
    build_rewards,
    check_gold_answers,
    check_reward_functions,
    completions_of,
    preference_rows,
    resolve_task,
)
from posttrain.rewards.reward_model import rendering_settings
from posttrain.rollout import make_engine
from posttrain.train import dist
from posttrain.train.comparisons import (
    best_and_others,
    comparison_accuracy,
    comparison_levels,
    comparison_matrix,
    comparison_step_source,
    is_ranking_batch,
)
from posttrain.train.engine import TrainConfig, Trainer, once_per_step
from posttrain.train.entry import stage_main
from posttrain.train.progress import RunProgress
from posttrain.train.run_dir import RunResult, prepare_run_dir
from posttrain.train.sources import ShuffledStepSource

RM_PAIR_SOURCES = ("data", "on_policy")


@dataclasses.dataclass(frozen=True)
class RMPairsConfig:
    source: str = param("data", "data: the data's comparisons (preference pairs or rankings). on_policy: pairs of "
                                "the starting model's own samples: the data's verifiable rows (prompt + answer) "
                                "are prompts, each gets sampling.samples_per_prompt completions scored by "
                                "`reward`, and its best- and worst-scored completions make a pair (with the task "
                                "verifier: a correct and an incorrect one); held-out pairs come the same way from "
                                "held-out prompts, and the data's held-out comparisons are scored as "
                                "eval_offline_*.", choices=RM_PAIR_SOURCES)
    prompts_per_batch: int = param(512, "On-policy: prompts sampled together (memory of one generate call).", ge=1)
    min_margin: float = param(0.0, "On-policy: a pair needs its chosen score to beat the rejected one by more than "
                                   "this.", ge=0)


@dataclasses.dataclass(frozen=True)
class RMConfig:
    run: RunConfig = section(lambda: RunConfig(name="rm"), "Run directory, seed, logging.")
    model: ModelConfig = section(lambda: ModelConfig(path="runs/sft/final"),
                                 "The causal LM whose trunk the reward model starts from (the SFT model).")
    adapter: AdapterConfig = section(AdapterConfig, "Full training, or LoRA (adapters + head). Prefix-tuning is "
                                                    "not supported for reward models.")
    data: DataConfig = section(lambda: DataConfig(source="arith", size=20_000, max_length=256),
                               "Preference pairs or rankings (kind=outcome), stepwise rows (kind=process).")
    optim: OptimConfig = section(lambda: OptimConfig(lr=1e-4, warmup_steps=10), "Optimizer and schedule.")
    train: TrainConfig = section(lambda: TrainConfig(max_steps=200, batch_size=32, micro_batch_size=32),
                                 "Loop length, batch size (comparisons or chains per step), checkpoints.")
    eval: RewardEvalConfig = section(RewardEvalConfig, "Held-out evaluation.")
    kind: str = param("outcome", "outcome: one reward per response, from comparisons; process: one score per "
                                 "reasoning step, from stepwise labels.", choices=("outcome", "process"))
    head: str = param("linear", "linear: a scalar head on the last token (loads with plain transformers); mlp: a "
                                "small MLP there; likelihood: no head, the reward is the causal LM's log-likelihood "
                                "of the response times reward_scale (it starts from what the SFT model knows; "
                                "saved as a causal LM).", choices=REWARD_HEADS)
    reward_scale: float = param(1.0, "head=likelihood: the reward is this times the response's summed (or mean) "
                                     "logprob; it sets how sharp the Bradley–Terry loss is on the logprob "
                                     "differences.", gt=0)
    reward_reduction: str = param("sum", "head=likelihood: sum: the response's summed logprob; mean: its mean per "
                                         "token (SimPO's length-normalised reward: a long right answer is not "
                                         "charged for its length against a short wrong one).",
                                  choices=LIKELIHOOD_REDUCTIONS)
    head_width: int = param(0, "Hidden width of the MLP head (0: the trunk's hidden size).", ge=0)
    freeze_backbone: bool = param(False, "Train the head only; the trunk stays as the SFT model left it.")
    use_margin: bool = param(True, "Subtract the rows' `margin` in the pairwise loss (rows without one: 0).")
    center_rewards: float = param(0.0, "Coefficient of the reward-centering penalty (0: off; ~0.01 keeps rewards "
                                       "near 0).", ge=0)
    pairs: RMPairsConfig = section(RMPairsConfig, "kind=outcome: the data's comparisons, or pairs of the starting "
                                                  "model's own samples.")
    sampling: SamplingConfig = section(lambda: SamplingConfig(samples_per_prompt=8, max_new_tokens=32),
                                       "On-policy pairs: how the starting model samples completions.")
    reward: RewardConfig = section(RewardConfig, "On-policy pairs: what ranks the completions of a prompt.")
    process_target: str = param("classification", "kind=process: per-step BCE on correct/wrong labels "
                                                   "(classification) or squared error on step values "
                                                   "(regression).", choices=PROCESS_TARGETS)


@stage_main(RMConfig)
def main(cfg: RMConfig) -> RunResult:
    check_config(cfg)
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    model = build_reward_model(cfg.model.path, head=cfg.head, head_width=cfg.head_width,
                               pad_token_id=tokenizer.pad_token_id, dtype=cfg.model.dtype,
                               trust_remote_code=cfg.model.trust_remote_code, disable_dropout=cfg.model.drops_dropout(),
                               reward_scale=cfg.reward_scale, reward_reduction=cfg.reward_reduction)
    check_tokenizer_fits(tokenizer, model)
    cfg = batches_for(cfg, model)
    accepts = STAGE_FORMATS["prm" if cfg.kind == "process" else "rm"]
    progress = RunProgress.for_run(cfg.run)
    on_policy = cfg.pairs.source == "on_policy"
    sampled: dict[str, Any] = {}
    if on_policy:
        prepared, heldout, sampled = sampled_pairs(cfg, tokenizer, model.dtype, progress)
    else:
        prepared = prepare_data(cfg.data, tokenizer, accepts=accepts, mask_dtype=model.dtype,
                                bars=progress.library_bars())
    heldout_cfg = heldout_data_config(cfg.data, cfg.eval)
    if on_policy and heldout_cfg is not None:  # a built-in task also yields comparisons of its held-out problems
        heldout_cfg = dataclasses.replace(heldout_cfg, format="auto") if heldout_cfg.source in TASKS else None
    offline = (prepare_data(heldout_cfg, tokenizer, accepts=accepts if on_policy else (prepared.format,),
                            mask_dtype=model.dtype, heldout=heldout_cfg.eval_split > 0, bars=progress.library_bars())
               if heldout_cfg else None)
    if not on_policy:
        heldout, offline = offline, None
    if cfg.kind == "process" and cfg.process_target == "classification":
        for rows in (prepared, heldout):
            check_step_probabilities(rows)
    run_dir = prepare_run_dir(cfg.run, cfg, stage="rm", model=model)

    if cfg.kind == "process":  # how ProcessRewardScorer turns head outputs into step scores
        model.config.process_target = cfg.process_target
    model.config.reward_rendering = rendering_settings(cfg.data)  # the scorers render completions as rows were
    if cfg.freeze_backbone:
        freeze_backbone(model)
    model = apply_adapter(model, cfg.adapter, task_type="CAUSAL_LM" if cfg.head == "likelihood" else "SEQ_CLS")
    trainer = Trainer(stage="rm", cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim, run_dir=run_dir,
                      model=model, tokenizer=tokenizer, progress=progress)
    steps = process_step_source if cfg.kind == "process" else comparison_step_source
    loss_fn = process_loss_fn(cfg) if cfg.kind == "process" else comparison_loss_fn(cfg)
    source = steps(prepared, cfg.train, cfg.run.seed)
    evaluator = (HeldoutEvaluator(model, heldout, cfg, steps(heldout, cfg.train, cfg.run.seed), loss_fn, progress,
                                  offline)
                 if heldout is not None else None)
    keys = ("loss", "accuracy", "eval_loss", "eval_accuracy", "eval_step_accuracy")
    evaluate = once_per_step(evaluator) if evaluator is not None else None
    result = trainer.fit(source, loss_fn, evaluate, progress_keys=keys)

    final_dir = save_trained(model, tokenizer, run_dir.final, cfg.adapter)
    summary = {"kind": cfg.kind, "format": prepared.format, "head": cfg.head,
               "trainable_parameters": count_parameters(model, trainable_only=True), **result.totals(),
               "final_loss": result.last.get("loss"),
               **{k: v for k, v in result.last.items() if k.startswith("eval_")},
               "eval_rows": len(heldout.dataset) if heldout else 0, "data": prepared.tokenized.stats.as_dict(),
               "pairs": cfg.pairs.source, **sampled,
               **({"eval_offline_rows": len(offline.dataset)} if offline is not None else {})}
    if evaluator is not None and evaluator.rows:
        held_out_of = cfg.eval.source or (f"{cfg.data.source}, data.eval_split" if cfg.data.eval_split
                                          else cfg.data.source)  # a task's held-out split, else
        plot_reward_distribution(evaluator.rows, run_dir.plots / "rewards.png", f"held-out rewards ({held_out_of})")
    write_training_report(run_dir, f"{'Process reward' if cfg.kind == 'process' else 'Reward'} model on "
                                   f"{cfg.data.source}", summary)
    return RunResult(run_dir=run_dir.path, final_dir=final_dir, summary=summary)


def sampled_pairs(cfg: RMConfig, tokenizer: Any, mask_dtype: torch.dtype,
                  progress: RunProgress) -> tuple[Prepared, Prepared | None, dict[str, float]]:
    """`pairs.source=on_policy`: the training pairs sampled by the starting causal LM from the data's prompts, the
    held-out pairs from the held-out prompts (eval.source / data.eval_split / the task's held-out split; None when
    there are none), and how the sampling went (pairs per prompt, the mean reward of the samples)."""
    _, policy = load_tokenizer_and_model(cfg.model)
    policy.eval()
    engine = make_engine(cfg.sampling.engine, policy, tokenizer)
    data = dataclasses.replace(cfg.data, batch_mode="padded")  # prompts: never collated
    prompts = prepare_data(data, tokenizer, accepts=STAGE_FORMATS["grpo"], mask_dtype=mask_dtype,
                           bars=progress.library_bars())
    check_gold_answers(prompts.dataset, prompts.tokenized.name, cfg)
    rewards = build_rewards(cfg.reward, resolve_task(cfg), prompts.dataset)
    pair_data = dataclasses.replace(cfg.data, source="<on-policy pairs>", format="auto", truncation="drop",
                                    eval_split=0.0)
    rows, stats = _sample_pairs(cfg, engine, prompts, rewards, cfg.run.seed, progress, "train")
    train = prepare_data(pair_data, tokenizer, accepts=("preference",), rows=rows, mask_dtype=mask_dtype)
    heldout_cfg = heldout_data_config(cfg.data, cfg.eval)
    if heldout_cfg is None:
        return train, None, stats
    heldout_prompts = prepare_data(heldout_cfg, tokenizer, accepts=STAGE_FORMATS["grpo"], mask_dtype=mask_dtype,
                                   heldout=heldout_cfg.eval_split > 0, bars=progress.library_bars())
    rows, heldout_stats = _sample_pairs(cfg, engine, heldout_prompts, rewards, cfg.run.seed + 1, progress, "held-out")
    heldout = prepare_data(dataclasses.replace(pair_data, batch_mode="padded"), tokenizer, accepts=("preference",),
                           rows=rows, mask_dtype=mask_dtype)
    return train, heldout, stats | {f"eval_{k}": v for k, v in heldout_stats.items()}


@torch.no_grad()
def _sample_pairs(cfg: RMConfig, engine: Any, prompts: Prepared, rewards: Any, seed: int, progress: RunProgress,
                  what: str) -> tuple[list[dict[str, str]], dict[str, float]]:
    """One pair per prompt whose samples differ in reward: its best- and worst-scored completions (distinct, with
    text). Every prompt is sampled once, in order, `pairs.prompts_per_batch` at a time, each batch with its own
    seed (`seed` and the batch's first row). Under torchrun the batches are shared out over the ranks (batch b on
    rank b mod world) and every rank gets every batch's pairs, in order: the pairs of one process (each rank sampled
    every prompt itself, so a sampler or reward that differs between ranks gave them different pairs)."""
    dataset, step = prompts.dataset, cfg.pairs.prompts_per_batch
    params = cfg.sampling.params()
    ctx = dist.context()
    starts = range(0, len(dataset), step)
    mine = starts[ctx.rank::ctx.world_size]
    batches: list[tuple[int, list[dict[str, str]]]] = []
    reward_sum, samples = 0.0, 0
    with progress.phase(f"sampling {what} pairs: prompts", sum(min(step, len(dataset) - s) for s in mine)) as bar:
        for start in mine:
            rows = [dataset[i] for i in range(start, min(start + step, len(dataset)))]
            generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
            rollout = engine.generate([row["prompt_input_ids"] for row in rows], params, generator=generator)
            completions = completions_of(rollout, rows)
            scores = rewards(completions)
            reward_sum, samples = reward_sum + scores.total.sum().item(), samples + len(scores.total)
            batches.append((start, preference_rows(completions, scores, rollout.prompt_index, cfg.pairs.min_margin)))
            bar.advance(len(rows))
    pairs = [pair for _, batch in sorted(dist.all_gather_list(batches), key=lambda b: b[0]) for pair in batch]
    reward_sum, samples = dist.all_reduce_sum(reward_sum), dist.all_reduce_sum(samples)
    if not pairs:
        raise DataError(f"no {what} prompt's samples differ in reward by more than pairs.min_margin="
                        f"{cfg.pairs.min_margin}, so there is no pair (more sampling.samples_per_prompt, other "
                        "prompts, or pairs.source=data)", field="pairs.source")
    return pairs, {"pairs_per_prompt": len(pairs) / len(dataset), "sampled_reward": reward_sum / samples}


def check_config(cfg: RMConfig) -> None:
    if not cfg.model.path:
        raise ConfigError("a reward model starts from an existing model: set model.path (e.g. runs/sft/final)",
                          field="model.path")
    if cfg.adapter.method == "prefix":
        raise ConfigError("prefix-tuning is not supported for reward models: use none or lora",
                          field="adapter.method")
    if cfg.adapter.method == "lora" and not cfg.adapter.merge_on_save:
        # An adapter directory has no config.json of its own: the head, rendering and target settings saved with a
        # reward model would be lost, and no scorer (the RL stages, `posttrain eval`, a critic's start) reads it.
        raise ConfigError("a LoRA reward model is saved merged into its base (what every scorer loads): leave "
                          "adapter.merge_on_save=true", field="adapter.merge_on_save")
    if cfg.pairs.source == "on_policy":
        if cfg.kind == "process":
            raise ConfigError("on-policy pairs train an outcome reward model: kind=outcome, or pairs.source=data",
                              field="pairs.source")
        if cfg.sampling.samples_per_prompt < 2:
            raise ConfigError("on-policy pairs compare the completions of a prompt: set "
                              "sampling.samples_per_prompt >= 2", field="sampling.samples_per_prompt")
        check_reward_functions(cfg.reward)
    if cfg.head == "likelihood" and cfg.kind == "process":
        raise ConfigError("a likelihood reward model scores whole responses; a process reward model needs a head "
                          "read at each step: head=linear or mlp", field="head")
    if cfg.kind == "process" and cfg.data.source in TASKS and "stepwise" not in TASKS[cfg.data.source].formats:
        raise ConfigError(f"a process reward model learns from steps labelled right or wrong; task "
                          f"{cfg.data.source!r} has none: data.source=multistep (the prm recipe: posttrain rm prm) "
                          "or a file of stepwise rows", field="data.source")
    if cfg.reward_reduction != "sum" and cfg.head != "likelihood":
        raise ConfigError(f"reward_reduction={cfg.reward_reduction} reduces a likelihood reward model's logprobs; a "
                          f"{cfg.head} head reads one score per response: head=likelihood, or leave it at sum",
                          field="reward_reduction")
    if cfg.head == "likelihood" and cfg.freeze_backbone:
        raise ConfigError("a likelihood reward model has no head to train alone: freeze_backbone=false (or "
                          "adapter.method=lora to train less)", field="freeze_backbone")
    if cfg.freeze_backbone and cfg.adapter.method != "none":
        raise ConfigError("freeze_backbone trains the head only; it cannot be combined with an adapter",
                          field="freeze_backbone")


def comparison_loss_fn(cfg: RMConfig):
    """Bradley–Terry on pairs (margin and soft labels from the rows), Plackett–Luce on rankings."""

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any], normaliser: float) -> tuple[torch.Tensor, dict]:
        rewards, present = comparison_matrix(sequence_scores(model, batch), batch)  # [B, K], best first
        levels = comparison_levels(batch, rewards)  # ties share a level
        soft = None if is_ranking_batch(batch) else batch["preference_probs"]
        if is_ranking_batch(batch):
            loss = plackett_luce_loss(rewards, present, levels)
        else:
            loss = bradley_terry_loss(rewards[:, 0], rewards[:, 1], batch["margin"] if cfg.use_margin else None,
                                      batch["preference_probs"])
        if cfg.center_rewards:
            loss = loss + cfg.center_rewards * reward_centering_penalty(rewards, present)
        share = len(rewards) / normaliser  # means over this micro-batch -> its part of the step's mean
        loss = loss * share
        with torch.no_grad():
            detached = rewards.detach()
            best, others = best_and_others(detached, present, levels)
            metrics = {"loss": loss.item(),
                       "accuracy": comparison_accuracy(detached, present, levels, soft).sum().item() / normaliser,
                       "chosen_reward": best.sum().item() / normaliser,
                       "rejected_reward": others.sum().item() / normaliser}
        metrics["margin"] = metrics["chosen_reward"] - metrics["rejected_reward"]
        return loss, metrics

    return loss_fn


def check_step_probabilities(prepared: Prepared | None) -> None:
    """process_target=classification reads a step's label as the probability that the step is right: 0/1, or soft
    in between. A label on another scale (PRM800K's ratings -1/0/1) would leave the loss unbounded below, so it is a
    DataError naming the row, not a run that diverges."""
    if prepared is None:
        return
    for line, labels in zip(prepared.dataset["line"], prepared.dataset["step_labels"], strict=True):
        bad = next((i for i, value in enumerate(labels) if not 0.0 <= value <= 1.0), None)
        if bad is not None:
            raise DataError(f"label {labels[bad]:g} is not in [0, 1]: process_target=classification reads it as the "
                            "probability that the step is right (map ratings such as PRM800K's -1/0/1 to 0/0/1 or "
                            "0/0.5/1, or train step values with process_target=regression)",
                            file=prepared.tokenized.name, line=line, field=f"labels[{bad}]")


def process_step_source(prepared: Prepared, train: TrainConfig, seed: int) -> ShuffledStepSource:
    """Shuffled steps of stepwise rows; the normaliser is the step's count of labelled reasoning steps."""
    dataset = prepared.dataset
    steps, lengths = row_lengths(dataset, "step_ends"), row_lengths(dataset, "input_ids")
    return ShuffledStepSource(len(dataset), train.batch_size, train.micro_batch_size, seed,
                              collate=lambda idx: prepared.collator([dataset[i] for i in idx]),
                              count=lambda idx: (float(sum(steps[i] for i in idx)), sum(lengths[i] for i in idx)),
                              rows=prepared.source)


def process_loss_fn(cfg: RMConfig):
    """Per-step loss at each step's separator token, over the step's labelled steps."""

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any], normaliser: float) -> tuple[torch.Tensor, dict]:
        scores = scores_at(model, batch, batch["step_ends"])  # [B, S]
        loss = process_reward_loss(scores, batch["step_labels"], batch["step_mask"], cfg.process_target, normaliser)
        right = (good_steps(scores.detach(), cfg.process_target) == (batch["step_labels"] >= 0.5))
        return loss, {"loss": loss.item(),
                      "accuracy": (right & batch["step_mask"].bool()).sum().item() / normaliser}

    return loss_fn


class HeldoutEvaluator:
    """Held-out metrics at evaluation steps — the training loss (`loss_fn`, batched and normalised by `source`, the
    step source over the held-out rows) and the accuracies — keeping the last rewards for the distribution plot."""

    def __init__(self, model: torch.nn.Module, heldout: Prepared, cfg: RMConfig, source: ShuffledStepSource,
                 loss_fn: Any, progress: RunProgress, offline: Prepared | None = None) -> None:
        self.model, self.heldout, self.cfg, self.offline = model, heldout, cfg, offline
        self.parts = heldout_loss_part(heldout, source, loss_fn, cfg.train.micro_batch_size, keys=("loss",))
        self.progress = progress
        self.rows: list[ScoredComparison] = []

    def __call__(self, step: int) -> dict[str, float]:
        metrics = Evaluation(self.parts, None, self.progress).run(self.model, step)
        if self.cfg.kind == "process":
            return metrics | process_metrics(self.model, self.heldout, self.cfg.eval.batch_size,
                                             self.cfg.process_target)
        self.rows = comparison_scores(self.model, self.heldout, self.cfg.eval.batch_size)
        metrics |= comparison_metrics(self.rows)
        if self.offline is not None:  # the data's own held-out comparisons, next to the sampled ones
            offline = comparison_scores(self.model, self.offline, self.cfg.eval.batch_size)
            metrics |= comparison_metrics(offline, prefix="eval_offline_")
        return metrics
