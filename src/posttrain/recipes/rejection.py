"""Rejection sampling (best-of-N -> SFT), for R rounds.

Each round samples N completions for each of `prompts_per_round` prompts with the current policy,
scores them (graders, task verifiers or a reward model: `reward.functions`, `reward.grader`), keeps

    best:       per prompt, the highest-scoring completion, if its score >= select.threshold
    threshold:  every completion scoring >= select.threshold

(completions cut by max_new_tokens are never kept: they are not finished answers), and trains on the
kept (prompt, completion) pairs with the SFT loss for `train.max_steps / rounds` steps. That is
weighted likelihood with 0/1 weights from the grader (see `recipes.rft` for the family). The next round
samples from the improved policy. Logged per round: pass@N (share of prompts with at least one correct
completion, by the task's verifier), the kept fraction, and the mean reward of the samples.

The SFT steps are the SFT recipe's own (`recipes.sft.step_source`, `sft_loss_fn`): the kept pairs go
through the same data pipeline (chat template, masks, EOS) as any SFT data set.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from posttrain.config import ModelConfig, OptimConfig, RunConfig, param, section
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import Prepared, prepare_data
from posttrain.data.schemas import holds_as_answer, prompt_as_given, tools_as_given
from posttrain.data.tasks.base import Task
from posttrain.data.tokenize import turn_end_ids
from posttrain.errors import ConfigError, DataError
from posttrain.eval import heldout
from posttrain.eval.accuracy import EvalConfig
from posttrain.eval.report import write_training_report
from posttrain.models import count_parameters, load_tokenizer_and_model
from posttrain.models.adapters import AdapterConfig, apply_adapter, save_trained
from posttrain.models.attention import position_limit
from posttrain.recipes.layout import batches_for, check_sampled_length
from posttrain.recipes.rl import (
    PromptStream,
    RewardConfig,
    SamplingConfig,
    build_rewards,
    check_gold_answers,
    check_reward_errors,
    check_reward_functions,
    check_sampling,
    completions_of,
    heldout_reward_part,
    log_reward_errors,
    resolve_task,
    reward_errors_of_step,
)
from posttrain.recipes.sft import sft_loss_fn, step_source
from posttrain.rewards.functions import Completions, Scores, WeightedRewards
from posttrain.rewards.reward_model import UNLIMITED_LENGTH
from posttrain.rollout import Rollout, RolloutEngine, make_engine
from posttrain.train import dist
from posttrain.train.engine import StepBatch, TrainConfig, Trainer, forward_precision
from posttrain.train.entry import stage_main
from posttrain.train.metrics import append_jsonl
from posttrain.train.progress import RunProgress
from posttrain.train.run_dir import RunResult, prepare_run_dir
from posttrain.train.sources import ShuffledStepSource


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    mode: str = param("best", "best: the top completion of each prompt; threshold: every completion scoring at "
                              "least select.threshold.", choices=("best", "threshold"))
    threshold: float = param(1.0, "Least reward a kept completion has (in best mode too: a prompt whose best "
                                  "completion scores less keeps nothing).")
    dedupe: bool = param(True, "Keep identical completions of one prompt once (threshold mode).")


@dataclasses.dataclass(frozen=True)
class RejectionConfig:
    RENAMED: ClassVar[dict[str, str]] = {"sampling.group_size": "sampling.samples_per_prompt"}

    run: RunConfig = section(lambda: RunConfig(name="rejection"), "Run directory, seed, logging.")
    model: ModelConfig = section(lambda: ModelConfig(path="runs/sft/final"), "The policy (the SFT model).")
    adapter: AdapterConfig = section(AdapterConfig, "Full fine-tuning, LoRA or prefix-tuning.")
    data: DataConfig = section(lambda: DataConfig(source="arith", size=20_000, max_length=256),
                               "Prompts with gold answers (verifiable rows).")
    optim: OptimConfig = section(lambda: OptimConfig(lr=1e-4, schedule="constant"), "Optimizer and schedule.")
    train: TrainConfig = section(lambda: TrainConfig(max_steps=60, batch_size=64, micro_batch_size=64),
                                 "SFT steps over all rounds (max_steps / rounds per round); batch sizes count "
                                 "kept completions.")
    sampling: SamplingConfig = section(lambda: SamplingConfig(samples_per_prompt=8),
                                       "How completions are sampled (samples_per_prompt = N per prompt).")
    reward: RewardConfig = section(RewardConfig, "What a completion is worth (graders: reward.grader).")
    select: SelectConfig = section(SelectConfig, "Which completions are kept.")
    rounds: int = param(2, "Sample -> select -> SFT rounds.", ge=1)
    prompts_per_round: int = param(256, "Prompts sampled each round (N completions each).", ge=1)
    eval: EvalConfig = section(EvalConfig, "Held-out evaluation: the rewards of greedy completions of held-out prompts "
                                           "(eval.source or data.eval_split), exact match on a built-in task.")
    eval_before: bool = param(True, "Also evaluate the starting model, to report the gain.")


@stage_main(RejectionConfig)
def main(cfg: RejectionConfig) -> RunResult:
    check_config(cfg)
    tokenizer, model = load_tokenizer_and_model(cfg.model)
    cfg = batches_for(cfg, model)
    progress = RunProgress.for_run(cfg.run)
    prepared = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS["rejection"], mask_dtype=model.dtype,
                            bars=progress.library_bars())
    check_sampled_length(model, prepared.tokenized.stats.length_max, cfg.sampling.max_new_tokens)
    check_gold_answers(prepared.dataset, prepared.tokenized.name, cfg)
    rows = heldout.prepare_heldout(cfg.data, cfg.eval, tokenizer, prepared.format, model.dtype, progress)
    task = resolve_task(cfg)
    rewards = build_rewards(cfg.reward, task, prepared.dataset, cfg.eval)
    run_dir = prepare_run_dir(cfg.run, cfg, stage="rejection", model=model)
    log_reward_errors(rewards, cfg.reward, run_dir.path)
    evaluation = heldout.Evaluation(heldout.accuracy_part(tokenizer, cfg.data, cfg.eval)
                                    + heldout_reward_part(cfg, tokenizer, rows, rewards), run_dir.samples, progress)

    with forward_precision(cfg.train, model):
        before = evaluation.run(model, 0) if cfg.eval_before and evaluation else None
    model = apply_adapter(model, cfg.adapter)
    source = RejectionStepSource(cfg, prepared, make_engine(cfg.sampling.engine, model, tokenizer), tokenizer,
                                 rewards, task=task, samples=run_dir.samples, progress=progress,
                                 longest_row=position_limit(model))
    trainer = Trainer(stage="rejection", cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim, run_dir=run_dir,
                      model=model, tokenizer=tokenizer, progress=progress)
    result = trainer.fit(source, sft_loss_fn, evaluation.evaluator(model),
                         progress_keys=("loss", "kept_fraction", "pass_at_n", "eval_reward", "eval_accuracy"))

    final_dir = save_trained(model, tokenizer, run_dir.final, cfg.adapter, turn_end_ids(tokenizer))
    last = result.last
    summary = {"rounds": source.prompts.rounds, "samples_per_prompt": cfg.sampling.samples_per_prompt,
               "select": cfg.select.mode, "trainable_parameters": count_parameters(model, trainable_only=True),
               **result.totals(),
               "per_round": source.history,
               **heldout.summary(before, last, cfg.eval, cfg.data, rows)}
    write_training_report(run_dir, f"Rejection sampling (best-of-{cfg.sampling.samples_per_prompt} -> SFT) on "
                                   f"{cfg.data.source}", summary)
    return RunResult(run_dir=run_dir.path, final_dir=final_dir, summary=summary)


def check_config(cfg: RejectionConfig) -> None:
    check_sampling(cfg.sampling)
    if not cfg.model.path:
        raise ConfigError("rejection sampling trains an existing model: set model.path (e.g. runs/sft/final)",
                          field="model.path")
    if cfg.train.max_steps < cfg.rounds:
        raise ConfigError(f"train.max_steps ({cfg.train.max_steps}) must give every one of the {cfg.rounds} rounds "
                          "at least one step", field="train.max_steps")
    # A checkpoint holds no round's pairs: a periodic one inside a round would resume with that round sampled again.
    every, per_round = cfg.train.save_every, _round_steps(cfg, 1)
    last_round_start = cfg.train.max_steps - _round_steps(cfg, cfg.rounds)
    inside_last = every and (last_round_start // every + 1) * every < cfg.train.max_steps
    if every and every < cfg.train.max_steps and (every % per_round or inside_last):
        raise ConfigError(f"train.save_every ({every}) must put checkpoints between rounds: a multiple of the "
                          f"{per_round} steps of a round, none inside the last round (steps {last_round_start + 1}-"
                          f"{cfg.train.max_steps}), or 0", field="train.save_every")
    check_reward_functions(cfg.reward)


def _round_steps(cfg: RejectionConfig, round_number: int) -> int:
    """The steps of round `round_number` (1-based): max_steps / rounds each, the last one the remainder too."""
    per_round = cfg.train.max_steps // cfg.rounds
    return cfg.train.max_steps - per_round * (cfg.rounds - 1) if round_number >= cfg.rounds else per_round


def trainable(rollout: Rollout) -> Tensor:
    """The completions an SFT row can hold [B] (bool): finished (not cut at max_new_tokens) and with an answer
    (`holds_as_answer`: not empty, as when the model ends at once or samples only special tokens; no stray
    <think>). A reward may score the others highest; selecting one would stop the round at tokenisation."""
    answers = torch.tensor([holds_as_answer(text) for text in rollout.texts], dtype=torch.bool)
    return ~rollout.truncated & answers


def distinct_prompts(rollout: Rollout) -> Tensor:
    """[B] one index per distinct prompt: a round of more prompts than the data has samples a row in two groups,
    whose samples are one prompt's (the best of them once; an identical completion kept once, not twice)."""
    index: dict[tuple[int, ...], int] = {}
    return torch.tensor([index.setdefault(tuple(ids[mask.bool()].tolist()), len(index))
                         for ids, mask in zip(rollout.prompt_ids, rollout.prompt_mask, strict=True)])


def select_kept(rewards: Tensor, prompt_index: Tensor, texts: Sequence[str], finished: Tensor, mode: str,
                threshold: float, dedupe: bool = True) -> list[int]:
    """Rows to keep (ascending): per prompt the best finished completion scoring >= threshold (ties: the
    first sampled), or every finished one scoring >= threshold (identical texts once with dedupe). `finished`
    marks the rows that may be kept (`trainable`, and scored without an error)."""
    kept: list[int] = []
    for prompt in torch.unique(prompt_index).tolist():
        rows = [i for i in (prompt_index == prompt).nonzero().flatten().tolist()
                if finished[i] and rewards[i] >= threshold]
        if mode == "best":
            kept += [max(rows, key=lambda i: (rewards[i].item(), -i))] if rows else []
            continue
        seen: set[str] = set()
        for i in rows:
            if not (dedupe and texts[i] in seen):
                kept.append(i)
                seen.add(texts[i])
    return sorted(kept)


def pass_at_n(correct: Sequence[float], prompt_index: Tensor) -> float:
    """Share of prompts with at least one correct completion among their N."""
    flags = torch.tensor([c > 0 for c in correct])
    prompts = torch.unique(prompt_index)
    return sum(bool(flags[prompt_index == p].any()) for p in prompts) / len(prompts)


class RejectionStepSource:
    """Rounds of sample -> score -> select, each followed by SFT steps over the round's kept pairs.

    A resumed run starts a fresh round (the prompt order and the round counter are restored).
    """

    def __init__(self, cfg: RejectionConfig, prepared: Prepared, engine: RolloutEngine,
                 tokenizer: PreTrainedTokenizerBase, rewards: WeightedRewards, *, task: Task | None = None,
                 samples: Any = None, progress: RunProgress | None = None, longest_row: int | None = None) -> None:
        self.cfg, self.dataset, self.engine, self.tokenizer = cfg, prepared.dataset, engine, tokenizer
        # A kept row is a sampled prompt (<= data.max_length, the longest prompt) with its completion (<=
        # sampling.max_new_tokens) and the template's closing tokens: cut at data.max_length, the longest answers
        # were dropped first. Only a learned position table (`longest_row`) limits it.
        self.longest_row = longest_row or UNLIMITED_LENGTH
        self.rewards, self.task, self.samples = rewards, task, samples
        self.progress = progress or RunProgress(enabled=False)
        self.prompts = PromptStream(self.dataset, cfg.prompts_per_round, cfg.run.seed, prepared.source,
                                    cfg.sampling.max_sequences)
        self.steps_per_round = _round_steps(cfg, 1)
        self.params = cfg.sampling.params()
        self.steps_in_round = 0
        self.inner: ShuffledStepSource | None = None
        self.round_metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.round_start = self.prompts.state_dict()  # the prompt stream before the current round sampled

    def steps_left_in_round(self) -> int:
        """The round's steps still to train (a stop waits for them: see `RLStepSource.steps_left_in_round`)."""
        return max(0, self.steps_per_round - self.steps_in_round) if self.inner is not None else 0

    def next_step(self) -> StepBatch:
        first = self.inner is None or (self.steps_in_round == self.steps_per_round
                                       and self.prompts.rounds < self.cfg.rounds)
        if first:
            resumed_inside = self.inner is None and self.steps_in_round > 0  # its steps so far are done
            self.round_start = self.prompts.state_dict()
            self.steps_in_round = self.steps_in_round if resumed_inside else 0
            self.inner = self.new_round(first_step=self.prompts.rounds * self.steps_per_round
                                        + self.steps_in_round + 1)
        self.steps_in_round += 1
        batch = self.inner.next_step()
        metrics = {**self.round_metrics, "round": self.prompts.rounds}
        if not first:
            metrics["generation_s"] = 0.0
        return dataclasses.replace(batch, metrics={**batch.metrics, **metrics})

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts.state_dict(), "history": self.history, "round_start": self.round_start,
                "steps_in_round": self.steps_in_round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Between rounds (check_config puts periodic checkpoints there): the next round as the uninterrupted run
        samples it. Inside one (a Ctrl-C's checkpoint): that round again, sampled from the model of the checkpoint,
        for its remaining steps, so the run still has `rounds` rounds and `max_steps` steps."""
        self.history, self.inner = list(state["history"]), None
        inside = state.get("round_start") is not None and 0 < state.get("steps_in_round", 0) < _round_steps(
            self.cfg, state["prompts"]["rounds"])
        if inside:
            self.prompts.load_state_dict(state["round_start"])
            self.history = self.history[:-1]
            self.steps_in_round = state["steps_in_round"]
        else:
            self.prompts.load_state_dict(state["prompts"])
        self.round_start = self.prompts.state_dict()

    def new_round(self, first_step: int = 1) -> ShuffledStepSource:
        """Sample, score, select; the SFT step source over the kept pairs, which trains from step `first_step` (a
        round resumed inside is drawn again: samples.jsonl tells its draws apart by that step)."""
        reward_errors_of_step(self.rewards, first_step)
        start = time.perf_counter()
        with torch.no_grad(), self.progress.phase(f"sampling round {self.prompts.rounds + 1}: prompts",
                                                  self.prompts.per_round) as bar:
            rows, rollout = self.prompts.sample(self.engine, self.params, bar.advance)
        completions = completions_of(rollout, rows)
        scores = self.rewards(completions)
        check_reward_errors(self.rewards)
        select = self.cfg.select
        kept = select_kept(scores.total, distinct_prompts(rollout), rollout.texts,
                           trainable(rollout) & ~scores.failed(), select.mode, select.threshold, select.dedupe)
        self._write_samples(rollout, completions, scores, set(kept), first_step)
        # Every rank sampled its share of the round's prompts; each trains its slice of the steps over all the kept
        # rows (`ShuffledStepSource`), so every rank holds all of them, in the order one process would have kept them.
        pairs = dist.all_gather_list([{"prompt": completions.prompts[i], "completion": completions.completions[i],
                                       "tools": completions.columns[i].get("tools")} for i in kept])
        self.round_metrics = self._metrics(rollout, completions, scores, kept) | {"kept": float(len(pairs))}
        self.round_metrics["generation_s"] = time.perf_counter() - start
        self.history.append({k: v for k, v in self.round_metrics.items() if k != "generation_s"})
        if not pairs:
            raise DataError(f"round {self.prompts.rounds}: no finished completion with an answer scored >= "
                            f"select.threshold ({select.threshold}); lower it or sample more "
                            "(sampling.samples_per_prompt)")
        data = DataConfig(source="<kept>", max_length=self.longest_row, template=self.cfg.data.template,
                          thinking=self.cfg.data.thinking, truncation="drop")
        prepared = prepare_data(data, self.tokenizer, accepts=("completion",), rows=pairs)
        return step_source(prepared, self.cfg.train, self.cfg.run.seed + self.prompts.rounds)

    def _metrics(self, rollout: Rollout, completions: Completions, scores: Scores, kept: list[int]) -> dict:
        prompts = len(torch.unique(rollout.prompt_index))
        metrics = {"reward": scores.total.mean().item(), "kept": float(len(kept)),
                   "kept_fraction": len(kept) / len(completions), "kept_prompts": len(
                       torch.unique(rollout.prompt_index[kept])) / prompts if kept else 0.0,
                   "completion_length": rollout.completion_lengths.float().mean().item()}
        metrics.update({f"reward_{name}": values.mean().item() for name, values in scores.by_function.items()})
        if self.task is not None:
            correct = [self.task.verify(c, a) for c, a in zip(completions.completions, completions.answers,
                                                             strict=True)]
            metrics["accuracy"] = sum(correct) / len(correct)
            metrics["pass_at_n"] = pass_at_n(correct, rollout.prompt_index)
        return metrics

    def _write_samples(self, rollout: Rollout, completions: Completions, scores: Scores, kept: set[int],
                       first_step: int) -> None:
        if self.samples is None:
            return
        errors = {e["row"]: e["error"] for e in scores.errors}
        append_jsonl(self.samples, [
            {"round": self.prompts.rounds, "step": first_step, "group": int(rollout.prompt_index[i]),
             "prompt": prompt_as_given(completions.prompts[i]),
             **tools_as_given(completions.columns[i] if completions.columns else {}), "completion": text,
             "answer": completions.answers[i], "reward": scores.total[i].item(),
             "rewards": {k: v[i].item() for k, v in scores.by_function.items()}, "kept": i in kept,
             "finish_reason": rollout.finish_reasons[i], **({"error": errors[i]} if i in errors else {})}
            for i, text in enumerate(completions.completions)])
