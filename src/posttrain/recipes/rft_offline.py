"""Offline RFT (`posttrain rft mode=offline`): reward-weighted likelihood on a fixed labelled data set.

Every response of the data set is scored once by the configured graders (`reward.functions`,
`reward.grader`), and the policy maximises the weighted likelihood

    L = - sum_i w_i log p(y_i | x_i) / sum_{i: w_i > 0} |y_i|        w_i = the score of response y_i (>= 0)

with `recipes.sft.step_source(..., weights=)` and the SFT loss: 0/1 scores make it SFT on the responses
scored 1, partial credit in [0, 1] weights the near misses in between (`recipes.rft` spells out the
family: SFT, rejection sampling, offline RFT, DPO). Responses scoring 0 are left out (they add nothing
to the loss or its normaliser). The normaliser counts tokens, not weights: a near miss scored 0.1 pulls a tenth
as hard as a right answer whatever else its step holds. No sampling, no critic, no reference model.

The data: prompts with candidate responses and the gold answer the graders read (`item.answer`):

    a built-in task (data.source=arith): per problem its correct completion and its plausible wrong
        ones (the task's ranking rows), with the gold answers of its verifiable rows;
    a file: ranking rows (prompt, responses) or completion rows (prompt, completion) with an `answer`
        column (and optional `steps`), e.g. {"prompt": "What is 2+3?", "completion": "6", "answer": "5"}.

The scored set is written to scored.jsonl in the run directory (every response with its score and the
score of each grader).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from posttrain.data.columns import column_values
from posttrain.data.config import DataConfig
from posttrain.data.pipeline import prepare_data
from posttrain.data.schemas import prompt_as_given, tools_as_given
from posttrain.data.sources import load_rows
from posttrain.data.tasks.base import THINK_CLOSE, THINK_OPEN
from posttrain.data.tokenize import turn_end_ids
from posttrain.errors import ConfigError, DataError
from posttrain.eval import heldout
from posttrain.eval.report import write_training_report
from posttrain.models import count_parameters, load_tokenizer_and_model
from posttrain.models.adapters import apply_adapter, save_trained
from posttrain.recipes.rl import build_rewards, check_reward_functions, resolve_task
from posttrain.recipes.sft import sft_loss_fn, step_source
from posttrain.rewards.error_log import RewardErrorLog
from posttrain.rewards.functions import Completions, Scores, WeightedRewards
from posttrain.train import dist
from posttrain.train.engine import TrainConfig, Trainer, forward_precision
from posttrain.train.metrics import append_jsonl
from posttrain.train.progress import RunProgress
from posttrain.train.run_dir import RunResult, prepare_run_dir
from posttrain.train.sources import ShuffledStepSource

RESPONSE_FORMATS = ("ranking", "completion")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One response to score and train on: its prompt and response as messages, the response's text
    (what a grader reads as sample.output_text) and the row's gold answer and steps."""

    prompt: list[dict[str, Any]]
    response: list[dict[str, Any]]
    text: str
    answer: str
    steps: list[str]
    columns: dict[str, Any] = dataclasses.field(default_factory=dict)  # the data row, every column (graders' item)


def train_offline(cfg: Any) -> RunResult:
    """RFT's offline mode (an RFTConfig with mode=offline): what `rft.main` runs for it."""
    check_config(cfg)
    tokenizer, model = load_tokenizer_and_model(cfg.model)
    candidates = load_candidates(cfg.data)
    rewards = build_rewards(cfg.reward, resolve_task(cfg))
    rewards.check_grader_columns(candidates[0].columns if candidates else {}, [c.answer for c in candidates],
                                 [c.steps for c in candidates])
    # Errors are printed and counted as the set is scored, before anything on disk is touched; kept on disk after.
    errors = RewardErrorLog(None, cfg.reward.max_error_fraction)
    rewards.error_log = errors
    scores = score_candidates(candidates, rewards)
    run_dir = prepare_run_dir(cfg.run, cfg, stage="rft", model=model)
    scored_file = run_dir.path / "scored.jsonl"
    if dist.is_main_process():  # a resumed run scores the same set again: keep one copy of its scores and errors
        scored_file.unlink(missing_ok=True)
        run_dir.reward_errors.unlink(missing_ok=True)
    dist.barrier()
    errors.attach(run_dir.path)  # every rank's errors, of the rows it scored
    append_jsonl(scored_file, scored_records(candidates, scores))
    source, trained = weighted_step_source(candidates, scores.total.tolist(), cfg.data, tokenizer, cfg.train,
                                           cfg.run.seed)

    progress = RunProgress.for_run(cfg.run)
    evaluation = heldout.Evaluation(heldout.accuracy_part(tokenizer, cfg.data, cfg.eval), run_dir.samples, progress)
    with forward_precision(cfg.train, model):
        before = evaluation.run(model, 0) if cfg.eval_before and evaluation else None
    model = apply_adapter(model, cfg.adapter)
    trainer = Trainer(stage="rft", cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim, run_dir=run_dir,
                      model=model, tokenizer=tokenizer, progress=progress)
    result = trainer.fit(source, sft_loss_fn, evaluation.evaluator(model), progress_keys=("loss", "eval_accuracy"))

    final_dir = save_trained(model, tokenizer, run_dir.final, cfg.adapter, turn_end_ids(tokenizer))
    summary = {"mode": "offline", "responses": len(candidates), "trained_responses": trained,
               "mean_weight": scores.total.mean().item(),
               **{f"mean_{name}": values.mean().item() for name, values in scores.by_function.items()},
               "grader_errors": len(scores.errors),
               "trainable_parameters": count_parameters(model, trainable_only=True), **result.totals(),
               "final_loss": result.last.get("loss"),
               **heldout.summary(before, result.last, cfg.eval, cfg.data)}
    write_training_report(run_dir, f"Offline RFT (reward-weighted likelihood) on {cfg.data.source}", summary)
    return RunResult(run_dir=run_dir.path, final_dir=final_dir, summary=summary)


def check_config(cfg: Any) -> None:
    if not cfg.model.path:
        raise ConfigError("offline RFT trains an existing model: set model.path (e.g. runs/sft/final)",
                          field="model.path")
    if cfg.data.eval_split or cfg.eval.source:
        raise ConfigError("offline RFT scores and trains every response of the data: it holds none out (evaluate "
                          "on a built-in task with eval.task)", field="data.eval_split" if cfg.data.eval_split
                          else "eval.source")
    if cfg.data.batch_mode != "padded":
        raise ConfigError("offline RFT weights each response's likelihood: it trains padded batches",
                          field="data.batch_mode")
    check_reward_functions(cfg.reward)


def load_candidates(data: DataConfig) -> list[Candidate]:
    """Every (prompt, response) of the data set with its row's gold answer: the responses of ranking or
    completion rows, the answers of the same source read as verifiable rows (row by row)."""
    responses = load_rows(data, accepts=RESPONSE_FORMATS)
    gold = load_rows(dataclasses.replace(data, format="verifiable"), accepts=("verifiable",))
    if len(gold.dataset) != len(responses.dataset):
        raise DataError(f"{len(responses.dataset)} rows of responses but {len(gold.dataset)} with an answer",
                        file=responses.name)
    out = []
    for row, item in zip(responses.dataset, gold.dataset, strict=True):
        if row["prompt"] != item["prompt"]:
            raise DataError("the prompt read with the responses differs from the one read with the answer",
                            file=responses.name, line=row["line"], field="prompt")
        columns = json.loads(item["row"]) if item.get("row") else {}
        for response in row["responses"] if responses.format == "ranking" else [row["completion"]]:
            out.append(Candidate(prompt=row["prompt"], response=response, text=response_text(response),
                                 answer=item["answer"], steps=list(item["steps"] or []), columns=columns))
    return out


def response_text(messages: Sequence[dict[str, Any]]) -> str:
    """What the model would have written: the last assistant turn, its reasoning as a thinking block."""
    turn = [m for m in messages if m["role"] == "assistant"][-1]
    thinking = f"{THINK_OPEN}{turn['reasoning']}{THINK_CLOSE}" if turn.get("reasoning") is not None else ""
    return thinking + turn["content"]


def score_candidates(candidates: Sequence[Candidate], rewards: WeightedRewards) -> Scores:
    """The reward of every response, checked to be a usable likelihood weight (finite, >= 0). Under torchrun each
    rank scores its share and every rank gets all the scores: ranks that each scored the whole set trained on
    different rows when a grader erred on one of them (a row scored 0 there is left out there alone)."""
    world, rank = dist.context().world_size, dist.context().rank
    mine = candidates[len(candidates) * rank // world:len(candidates) * (rank + 1) // world]
    log = rewards.error_log
    if log is not None:  # the share of the errors is the whole set's, judged alike on every rank below
        log.deferred = True
    try:
        part = rewards(Completions(prompts=[c.prompt for c in mine], completions=[c.text for c in mine],
                                   answers=[c.answer for c in mine], steps=[c.steps for c in mine],
                                   columns=[c.columns for c in mine])) if mine else None
    finally:
        if log is not None:
            log.deferred = False
    gathered = dist.all_gather_list([None if part is None else
                                     (part.total, part.by_function, part.errors)])
    scores = Scores.concat([Scores(*fields) for fields in gathered if fields is not None])
    if log is not None:
        log.check_fraction(scores.errors, len(candidates))
    # A response some function failed on has no reward to weigh it by (its total would be the other functions'
    # alone): it weighs 0, as in every other stage, where such a completion trains on nothing.
    total = torch.where(scores.failed(), 0.0, scores.total)
    scores = dataclasses.replace(scores, total=total)
    if not bool(torch.isfinite(total).all()) or bool((total < 0).any()):
        raise ConfigError(f"offline RFT weights each response's likelihood by its reward, which must be finite and "
                          f">= 0 (got {total.min().item():g} .. {total.max().item():g}): use graders or "
                          "non-negative reward functions", field="reward.functions")
    if not bool((total > 0).any()):
        raise DataError(f"every one of the {len(candidates)} responses scores 0: nothing to train on")
    return scores


def weighted_step_source(candidates: Sequence[Candidate], weights: Sequence[float], data: DataConfig,
                         tokenizer: PreTrainedTokenizerBase, train: TrainConfig,
                         seed: int) -> tuple[ShuffledStepSource, int]:
    """The SFT step source over the responses weighted > 0, each with its weight; and how many those are."""
    positive = [i for i, w in enumerate(weights) if w > 0]
    # The row's tool schemas go with it: trained without them, a tool conversation renders without the block
    # the chat template writes for them (as `posttrain sft` renders the same file with).
    pairs = [{"prompt": candidates[i].prompt, "completion": candidates[i].response,
              "tools": candidates[i].columns.get("tools")} for i in positive]
    scored = DataConfig(source="<scored>", max_length=data.max_length, truncation=data.truncation,
                        loss_on=data.loss_on, template=data.template, thinking=data.thinking)
    # The rows handed in memory carry no digest of the data (`Prepared.source`): the candidates as read from the
    # user's file are what a resumed run must find again (an edited file of as many rows was trained on silently).
    prepared = dataclasses.replace(prepare_data(scored, tokenizer, accepts=("completion",), rows=pairs),
                                   source=candidates_as_read(candidates))
    # Rows too long for data.max_length may be dropped: `line` says which candidate each kept row is.
    row_weights = [float(weights[positive[line - 1]]) for line in column_values(prepared.dataset, "line")]
    return step_source(prepared, train, seed, weights=row_weights), len(row_weights)


def candidates_as_read(candidates: Sequence[Candidate]) -> Dataset:
    """The candidates (prompt, response, gold answer and steps, the row's columns) as a table, one row each: what a
    checkpoint's digest of the data is taken over."""
    return Dataset.from_list([{"prompt": json.dumps(c.prompt, sort_keys=True), "response": json.dumps(
        c.response, sort_keys=True), "answer": c.answer, "steps": json.dumps(c.steps), "columns": json.dumps(
        c.columns, sort_keys=True, default=str)} for c in candidates])


def scored_records(candidates: Sequence[Candidate], scores: Scores) -> list[dict[str, Any]]:
    errors = {e["row"]: e["error"] for e in scores.errors}
    return [{"prompt": prompt_as_given(c.prompt), **tools_as_given(c.columns), "completion": c.text, "answer": c.answer,
             "reward": scores.total[i].item(), "rewards": {k: v[i].item() for k, v in scores.by_function.items()},
             **({"error": errors[i]} if i in errors else {})} for i, c in enumerate(candidates)]
