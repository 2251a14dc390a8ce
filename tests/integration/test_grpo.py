"""GRPO recipe on the tiny model: the first update's ratio is 1 with no clipping and no KL, equal-reward groups
add no gradient, sampler and trainer logprobs agree, rewards and advantages follow their completion when rows are
reordered, truncation is flagged (and masked on request), EOS is trained, process advantages are those of `algos`,
the token-mean loss is invariant to micro-batching, and a run writes a complete run directory."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from posttrain.algos import group_advantages, process_advantages
from posttrain.config import ModelConfig, load_config
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import prepare_data
from posttrain.data.tasks import get_task
from posttrain.eval.evaluate import EvalOptions, evaluate, load_policy, resolve_target
from posttrain.models import build_model, save_pretrained
from posttrain.models.value import ActorCritic
from posttrain.recipes import find_recipe
from posttrain.recipes.grpo import GRPOConfig, ProcessRewards, main
from posttrain.recipes.rl_loop import RLStepSource, rl_loss_fn, rollout_forward
from posttrain.rewards.functions import WeightedRewards
from posttrain.rewards.steps import verifier_step_scorer
from posttrain.rollout import Rollout, RolloutEngine, make_engine, text_rollout
from posttrain.rollout.recompute import PaddingFree
from posttrain.train.metrics import read_metrics
from posttrain.train.reference import Reference

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FAST = ["run.progress=false", "train.save_every=0", "eval.problems=4", "eval.samples=2", "eval.max_new_tokens=4",
        "eval_before=false", "data.size=32"]


@pytest.fixture(scope="module")
def lm_dir(tokenizer, tmp_path_factory):
    model = build_model(ModelConfig(size="tiny"), tokenizer, seed=0)
    return str(save_pretrained(model, tokenizer, tmp_path_factory.mktemp("lm") / "lm"))


def grpo_config(model_dir: str, out, *overrides: str) -> GRPOConfig:
    return load_config(GRPOConfig, find_recipe("grpo").path, [f"model.path={model_dir}", f"run.out_dir={out}", *FAST,
                                                              *overrides])


def text_score(text: str) -> float:
    """A deterministic reward of the completion text alone, different for almost every text."""
    return float(zlib.crc32(text.encode()) % 97)


TEXT_REWARD = WeightedRewards({"text": (lambda batch: [text_score(t) for t in batch.completions], 1.0)})


def make_source(model, tokenizer, *overrides: str, rewards=TEXT_REWARD, engine=None, source="arith", size=16,
                **kwargs) -> RLStepSource:
    cfg = load_config(GRPOConfig, None, ["model.path=unused", "train.batch_size=16", "train.micro_batch_size=16",
                                         "sampling.samples_per_prompt=4", "sampling.max_new_tokens=6", *overrides])
    prepared = prepare_data(DataConfig(source=source, size=size), tokenizer, accepts=STAGE_FORMATS["grpo"])
    return RLStepSource(cfg, prepared, engine or make_engine("local", model, tokenizer), policy(model), rewards,
                        **kwargs)


def policy(model) -> ActorCritic:
    """The module GRPO trains: the policy alone, no critic."""
    return ActorCritic(model, values=False)


def eos_bias(model, bias: float):
    """Add `bias` to the EOS logit of every forward (a hook on lm_head, which sampler and trainer both call)."""
    eos = model.config.eos_token_id

    def hook(module, inputs, output):
        output[..., eos] += bias
        return output

    return model.lm_head.register_forward_hook(hook)


def gradient(model, step, loss_fn) -> torch.Tensor:
    model.zero_grad()
    for micro_batch in step.micro_batches:
        loss, _ = loss_fn(policy(model), micro_batch, step.normaliser)
        loss.backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def test_a_run_writes_a_complete_run_directory_and_starts_at_ratio_one(lm_dir, tmp_path):
    result = main(grpo_config(lm_dir, tmp_path, "train.max_steps=3", "train.batch_size=16", "train.micro_batch_size=8",
                              "sampling.samples_per_prompt=4", "sampling.max_new_tokens=6", "kl.coef=0.1",
                              "update.epochs=2", "optim.lr=1e-2", "eval_before=true",
                              # brevity: rewards that differ within a group whatever this random model writes
                              f"reward.functions={{correct: 1.0, format: 0.5, {EXAMPLES}/rewards.py:brevity: 0.1}}"))
    metrics = read_metrics(result.run_dir / "metrics.jsonl")
    first, second, third = metrics
    # First pass over a fresh batch: pi = pi_old = pi_ref, so the ratio is 1, nothing is clipped, no KL.
    assert first["ratio"] == 1.0 and first["clip_fraction"] == 0.0 and first["approx_kl"] == 0.0
    assert_close(torch.tensor(first["kl"]), torch.tensor(0.0))
    assert first["logprob_mismatch"] < 1e-5
    # Step 2 reuses the batch after one update: the ratio moved; step 3 samples a new batch. The round's
    # statistics (pi_old's KL and its mismatch with the sampler) are measured once and reported with both steps.
    assert second["epoch"] == 2 and second["generation_s"] == 0.0
    assert second["logprob_mismatch"] == first["logprob_mismatch"] and second["kl"] == first["kl"]
    assert second["approx_kl"] > 0 and second["ratio"] != 1.0
    assert "logprob_mismatch" in third and third["kl"] > 0
    for key in ("reward", "reward_std", "reward_correct", "reward_format_std", "accuracy", "completion_length",
                "truncated", "entropy", "clip_fraction", "generation_share", "zero_variance_groups", "grad_norm"):
        assert key in first, key
    assert 0 < first["generation_share"] < 1
    rollouts = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    rollouts = [r for r in rollouts if "reward" in r]
    assert [r["step"] for r in rollouts] == [1] * 16 + [3] * 16  # every generated rollout, with its step
    assert {"completion", "reward", "rewards", "advantage", "finish_reason", "truncated"} <= set(rollouts[0])
    summary = result.summary
    assert {"accuracy_before", "accuracy", "reward", "kl", "steps"} <= set(summary)
    for name in ("config.yaml", "report.md", "plots/curves.png", "final/model.safetensors"):
        assert (result.run_dir / name).is_file(), name
    AutoModelForCausalLM.from_pretrained(result.final_dir, local_files_only=True)


def test_a_bf16_model_starts_at_ratio_one_with_a_reference_and_two_updates(lm_dir, tmp_path, capsys):
    """model.dtype=bfloat16 (weights in bf16, not autocast): pi_old's and the reference's logprobs are kept in
    float32, as the trainer computes them, so the first update's ratio is exactly 1 and the KL exactly 0 (held in
    bf16 they would round by up to ~0.03; writing float32 into a bf16 buffer failed outright before)."""
    result = main(grpo_config(lm_dir, tmp_path, "model.dtype=bfloat16", "train.max_steps=2", "train.batch_size=16",
                              "train.micro_batch_size=8", "sampling.samples_per_prompt=4",
                              "sampling.max_new_tokens=6", "kl.coef=0.1", "update.epochs=2", "optim.lr=1e-2",
                              f"reward.functions={{correct: 1.0, {EXAMPLES}/rewards.py:brevity: 0.1}}"))
    first, second = read_metrics(result.run_dir / "metrics.jsonl")
    assert first["ratio"] == 1.0 and first["clip_fraction"] == 0.0 and first["approx_kl"] == 0.0
    assert first["kl"] == 0.0
    assert second["approx_kl"] > 0
    assert "weights in bfloat16" in capsys.readouterr().out  # the log says what the weights are, not only the autocast


@pytest.mark.parametrize("adapter", [[], ["adapter.method=lora"]])
def test_a_checkpoints_policy_is_rebuilt_for_evaluation(lm_dir, tmp_path, adapter):
    # An RL checkpoint holds the ActorCritic's tensors (for resuming); the policy `posttrain eval` rebuilds from them
    # on the model the run started from (with the run's LoRA on it, merged: such a checkpoint was refused) is, at
    # the last step, the final model, tensor for tensor.
    result = main(grpo_config(lm_dir, tmp_path, "train.max_steps=2", "train.batch_size=16", "train.micro_batch_size=8",
                              "sampling.samples_per_prompt=4", "sampling.max_new_tokens=6", "update.epochs=2",
                              "optim.lr=1e-2", "kl.coef=0.1", "train.save_every=2", *adapter,
                              f"reward.functions={{correct: 1.0, {EXAMPLES}/rewards.py:brevity: 0.1}}"))
    final = AutoModelForCausalLM.from_pretrained(result.final_dir, local_files_only=True).state_dict()
    checkpoint = resolve_target(result.run_dir / "checkpoints" / "step-2")
    rebuilt = load_policy(checkpoint)[1].state_dict()
    assert checkpoint.actor_tensors and rebuilt.keys() == final.keys()
    assert all(torch.equal(rebuilt[name], final[name]) for name in final)
    # ... and evaluating the checkpoint directory gives what evaluating final/ gives.
    options = EvalOptions(problems=8, samples=0)
    scored = evaluate(result.run_dir / "checkpoints" / "step-2", options, write=False)
    expected = evaluate(result.final_dir, options, write=False)
    assert scored["problems"] == 8
    assert (scored["accuracy"], scored["completion_length"]) == (expected["accuracy"], expected["completion_length"])
    start = AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True).state_dict()
    assert not all(torch.equal(rebuilt[name], start[name]) for name in start)  # trained: not the starting weights


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_and_trainer_logprobs_agree(tiny_model, tokenizer, temperature):
    source = make_source(tiny_model, tokenizer, f"sampling.temperature={temperature}")
    step = source.next_step()
    _, metrics = rl_loss_fn(source.cfg, 6)(policy(tiny_model), step.micro_batches[0], step.normaliser)
    assert metrics["logprob_mismatch"] < 1e-5 and metrics["ratio"] == 1.0


def test_a_group_with_equal_rewards_contributes_no_gradient(tiny_model, tokenizer):
    def reward(batch):  # the first prompt's completions all score 1, the others score by their text
        return [1.0 if p == batch.prompts[0] else text_score(t) for p, t in zip(batch.prompts, batch.completions,
                                                                                strict=True)]

    source = make_source(tiny_model, tokenizer, rewards=WeightedRewards({"r": (reward, 1.0)}))
    step = source.next_step()
    [batch] = step.micro_batches
    equal = batch.rollout.prompt_index == 0
    assert_close(batch.advantages[equal], torch.zeros_like(batch.advantages[equal]))

    def only(rows):
        return dataclasses.replace(step, micro_batches=[dataclasses.replace(batch,
                                                                            loss_mask=batch.loss_mask * rows[:, None])])

    loss_fn = rl_loss_fn(source.cfg, 6)
    assert torch.count_nonzero(gradient(tiny_model, only(equal), loss_fn)) == 0
    assert_close(gradient(tiny_model, only(~equal), loss_fn), gradient(tiny_model, step, loss_fn))
    assert torch.count_nonzero(gradient(tiny_model, step, loss_fn)) > 0


def test_equal_reward_groups_have_zero_advantage_and_can_be_skipped(tiny_model, tokenizer):
    def reward(batch):  # constant within the groups of some prompts (a stable hash: hash() is randomised)
        return [0.5 if zlib.crc32(str(p).encode()) % 2 == 0 else text_score(t)
                for p, t in zip(batch.prompts, batch.completions, strict=True)]

    rewards = WeightedRewards({"r": (reward, 1.0)})
    full = make_source(tiny_model, tokenizer, rewards=rewards).next_step()
    skipped = make_source(tiny_model, tokenizer, "advantage.skip_zero_variance=true", rewards=rewards).next_step()
    zero_share = full.metrics["zero_variance_groups"]
    kept_rows = sum(len(b.rows) for b in skipped.micro_batches)
    assert kept_rows == round(16 * (1 - zero_share))
    for batch in skipped.micro_batches:
        assert bool((batch.advantages != 0).any(dim=1).all())
    assert skipped.normaliser == sum(float(b.loss_mask.sum()) for b in skipped.micro_batches)

    constant = WeightedRewards({"r": (lambda batch: [0.5] * len(batch), 1.0)})
    nothing = make_source(tiny_model, tokenizer, "advantage.skip_zero_variance=true", rewards=constant).next_step()
    assert nothing.micro_batches == [] and nothing.metrics["zero_variance_groups"] == 1.0


def test_completions_whose_reward_failed_are_left_out_of_the_round_and_its_baselines(tiny_model, tokenizer):
    def failing(text: str) -> bool:
        return zlib.crc32(text.encode()) % 3 == 0

    def reward(batch):  # NaN (a reward error) on about a third of the completions, the text's score elsewhere
        return [float("nan") if failing(t) else text_score(t) for t in batch.completions]

    sampled = {}
    rewards = WeightedRewards({"r": (reward, 1.0)})
    rewards.error_log = lambda scores, batch: sampled.update(texts=list(batch.completions), prompts=batch.prompts)
    source = make_source(tiny_model, tokenizer, rewards=rewards)
    step = source.next_step()
    failed = [failing(t) for t in sampled["texts"]]
    assert 0 < sum(failed) <= 8
    kept = [i for i, f in enumerate(failed) if not f]
    assert list(source.last.rollout.texts) == [sampled["texts"][i] for i in kept]
    assert step.metrics["failed_rows"] == sum(failed)
    # Groups are the kept completions' prompts (one whose every completion failed is gone), numbered 0, 1, ...
    prompts = [str(sampled["prompts"][i]) for i in kept]
    groups = {p: g for g, p in enumerate(dict.fromkeys(prompts))}
    assert source.last.rollout.prompt_index.tolist() == [groups[p] for p in prompts]
    assert [str(row["prompt"]) for row in source.last.rows] == list(groups)
    # The baselines are those of the scored completions alone, worked out here from the texts.
    scores = torch.tensor([text_score(sampled["texts"][i]) for i in kept], dtype=torch.float64)
    assert_close(source.last.scores, scores)
    expected = group_advantages(scores, torch.tensor([groups[p] for p in prompts]))
    mask = source.last.rollout.response_mask.bool()
    assert_close(source.last.advantages, (expected.unsqueeze(1) * mask).to(torch.float32))
    assert sum(len(b.rows) for b in step.micro_batches) == len(kept)


def test_rewards_and_advantages_stay_with_their_completion_after_reordering(tiny_model, tokenizer):
    source = make_source(tiny_model, tokenizer, "train.micro_batch_size=4", "sampling.max_new_tokens=8")
    step = source.next_step()
    rows = torch.cat([b.rows for b in step.micro_batches])
    assert sorted(rows.tolist()) == list(range(16)) and rows.tolist() != list(range(16))  # reordered
    texts = [t for b in step.micro_batches for t in b.rollout.texts]
    groups = torch.cat([b.rollout.prompt_index for b in step.micro_batches])
    assert_close(groups, source.last.rollout.prompt_index[rows])
    rewards = torch.tensor([text_score(t) for t in texts], dtype=torch.float64)
    expected = group_advantages(rewards, groups)  # recomputed from the shuffled order: grouped by id, not position
    for batch, want in zip(step.micro_batches, expected.split(4), strict=True):
        assert_close(batch.scores, torch.tensor([text_score(t) for t in batch.rollout.texts], dtype=torch.float64))
        mask = batch.rollout.response_mask.bool()
        assert_close(batch.advantages, (want.unsqueeze(1) * mask).to(torch.float32))


def test_truncated_completions_are_flagged_masked_on_request_and_eos_is_trained(tiny_model, tokenizer, tmp_path):
    handle = eos_bias(tiny_model, 4.0)  # some completions end in EOS, the others run into max_new_tokens
    try:
        for mask_truncated in (False, True):
            samples = tmp_path / f"samples-{mask_truncated}.jsonl"
            source = make_source(tiny_model, tokenizer, f"loss.mask_truncated={mask_truncated}",
                                 "sampling.max_new_tokens=4", "loss.agg=seq-mean-token-mean", samples=samples)
            step = source.next_step()
            batch = step.micro_batches[0]
            rollout = batch.rollout
            truncated = rollout.truncated
            assert 0 < int(truncated.sum()) < len(truncated)
            assert [json.loads(line)["truncated"] for line in samples.read_text().splitlines()] == [
                r == "length" for r in source.last.rollout.finish_reasons]
            lengths = rollout.completion_lengths
            for row in range(len(truncated)):
                if rollout.finish_reasons[row] == "eos":  # EOS is the last trained token
                    last = int(lengths[row]) - 1
                    assert int(rollout.completion_ids[row, last]) == tokenizer.eos_token_id
                    assert batch.loss_mask[row, last] == 1 and batch.loss_mask[row, last + 1:].sum() == 0
            kept = batch.loss_mask.sum(dim=1) > 0
            assert bool((kept == ~truncated).all()) if mask_truncated else bool(kept.all())
            # A sequence mean is over the rows in the loss: masked truncated rows are not counted.
            assert step.normaliser == int(kept.sum()) and batch.sequence_share == 1.0
            assert step.metrics["trained_fraction"] == float(kept.float().mean())
    finally:
        handle.remove()


def test_a_round_with_no_completion_in_the_loss_is_said_once_with_its_causes(tiny_model, tokenizer, caplog):
    """Every group tied under skip_zero_variance, or every completion cut at max_new_tokens under mask_truncated:
    the round's steps train nothing. The metric says so each round; a warning once, naming the settings."""
    constant = WeightedRewards({"r": (lambda batch: [0.5] * len(batch), 1.0)})
    tied = make_source(tiny_model, tokenizer, "advantage.skip_zero_variance=true", rewards=constant)
    with caplog.at_level(logging.WARNING, logger="posttrain.recipes.rl_loop"):
        assert [tied.next_step().metrics["trained_fraction"] for _ in range(2)] == [0.0, 0.0]
    said = [r.getMessage() for r in caplog.records if "train nothing" in r.getMessage()]
    assert said == ["round 1: none of its 16 completions is in the loss, so its steps train nothing: 16 in groups "
                    "whose completions tied (advantage.skip_zero_variance=true leaves them out). Said once; the "
                    "trained_fraction metric counts every round"]
    caplog.clear()
    handle = eos_bias(tiny_model, -1e4)  # no completion ends: all of them run into max_new_tokens
    try:
        cut = make_source(tiny_model, tokenizer, "loss.mask_truncated=true")
        with caplog.at_level(logging.WARNING, logger="posttrain.recipes.rl_loop"):
            assert cut.next_step().metrics["trained_fraction"] == 0.0
    finally:
        handle.remove()
    assert "16 cut at sampling.max_new_tokens=6 (loss.mask_truncated=true leaves them out)" in caplog.text


class TextEngine(RolloutEngine):
    """Returns fixed completion texts for each prompt (keyed by its token ids) as a Rollout ending in EOS."""

    def __init__(self, tokenizer, completions: dict[tuple[int, ...], list[str]]) -> None:
        self.tokenizer, self.completions = tokenizer, completions

    def update_weights(self, model) -> None:
        pass

    def generate(self, prompts, params, generator=None) -> Rollout:
        return text_rollout(prompts, [self.completions[tuple(p)] for p in prompts], self.tokenizer)


@pytest.mark.parametrize("baseline", ["group", "position"])
def test_process_advantages_through_the_recipe_match_algos(tiny_model, tokenizer, baseline):
    prepared = prepare_data(DataConfig(source="multistep", size=2), tokenizer, accepts=STAGE_FORMATS["grpo"])
    task = get_task("multistep")
    rows = {tuple(row["prompt_input_ids"]): row for row in prepared.dataset}
    completions = {}
    for key, row in rows.items():
        steps, answer = row["steps"], row["answer"]
        wrong = str(int(steps[0]) + 1)
        completions[key] = [
            "\n".join(f"1+1={s}" for s in steps) + f"\nAnswer: {answer}",  # values right, arithmetic wrong
            f"0+{steps[0]}={steps[0]}\nAnswer: {steps[0]}",                # first step right, stops early
            f"0+{wrong}={wrong}\nAnswer: {answer}",                         # wrong step, right answer
            "I do not know."]                                              # no step at all
    rewards = WeightedRewards.from_config({"correct": 1.0}, task=task)
    source = make_source(tiny_model, tokenizer, "train.batch_size=8", "advantage.supervision=process",
                         engine=TextEngine(tokenizer, completions), rewards=rewards, source="multistep", size=2,
                         step_rewards=ProcessRewards(verifier_step_scorer(task), tokenizer,
                                                     by_position=baseline == "position"))
    step = source.next_step()
    rollout = source.last.rollout
    # Independently: a step ends at its newline token; the outcome reward is one more step at the last token.
    newline = tokenizer.convert_tokens_to_ids("Ċ")
    step_rewards, step_ends = [], []
    for i, text in enumerate(rollout.texts):
        row = rows[tuple(rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist())]
        scores = task.verify_steps(text, row["steps"])
        ids = rollout.completion_ids[i, :int(rollout.completion_lengths[i])].tolist()
        ends = [t for t, token in enumerate(ids) if token == newline][:len(task.step_char_ends(text))]
        step_rewards.append([*(scores[j] if j < len(scores) else 0.0 for j in range(len(ends))),
                             task.verify(text, row["answer"])])
        step_ends.append([*ends, len(ids) - 1])
    groups = [rows[tuple(p[m.bool()].tolist())] for p, m in zip(rollout.prompt_ids[::4], rollout.prompt_mask[::4],
                                                                  strict=True)]
    assert [len(e) for e in step_ends] == [n for row in groups for n in (len(row["steps"]) + 1, 2, 2, 1)]
    width = max(len(r) for r in step_rewards)
    pad = lambda rows, value: torch.tensor([r + [value] * (width - len(r)) for r in rows])  # noqa: E731
    # By position: step j of one completion against step j of the others, the outcome (-1) against the outcomes.
    positions = pad([[*range(len(r) - 1), -1] for r in step_rewards], 0) if baseline == "position" else None
    expected = process_advantages(pad(step_rewards, 0.0).double(), pad([[1] * len(r) for r in step_rewards], 0),
                                  pad(step_ends, 0), rollout.prompt_index, rollout.response_mask,
                                  step_positions=positions)
    assert expected.abs().sum() > 0
    for batch in step.micro_batches:
        assert_close(batch.advantages, expected[batch.rows, :batch.advantages.shape[1]].float())


def test_the_token_mean_loss_is_invariant_to_micro_batching(tiny_model, tokenizer):
    model = tiny_model.double()
    reference = Reference.frozen_copy(model)
    with torch.no_grad():  # move the policy off the reference, so the KL term has a gradient too
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-2)
    grads = []
    for micro in (16, 5):
        source = make_source(model, tokenizer, f"train.micro_batch_size={micro}", "kl.coef=0.2",
                             "loss.agg=token-mean", reference=reference)
        step = source.next_step()
        grads.append(gradient(model, step, rl_loss_fn(source.cfg, 6)))
    assert_close(grads[1], grads[0])  # 16 rows in one micro-batch, or in micro-batches of 5, 5, 5 and 1


def test_the_logged_kl_is_the_mean_over_the_steps_completions_however_it_is_micro_batched(tiny_model, tokenizer):
    """With loss.mask_truncated the first pass's KL was weighted by each micro-batch's trained rows only: the
    logged KL changed with train.micro_batch_size (3.38 against 3.56). It is the mean of each completion's summed
    KL over every completion of the step, as the round's KL in the reward is."""
    model = tiny_model.double()
    reference = Reference.frozen_copy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-2)
    handle = eos_bias(model, 4.0)  # some completions end in EOS, the others are cut (and masked)
    try:
        logged = []
        for micro in (16, 4, 3):
            source = make_source(model, tokenizer, f"train.micro_batch_size={micro}", "kl.coef=0.2",
                                 "loss.mask_truncated=true", "sampling.max_new_tokens=4", reference=reference)
            step = source.next_step()
            loss_fn = rl_loss_fn(source.cfg, 4)
            with torch.no_grad():
                logged.append(sum(loss_fn(policy(model), m, step.normaliser)[1]["kl"] for m in step.micro_batches))
            rollout = source.last.rollout
            assert 0 < int(rollout.truncated.sum()) < len(rollout.truncated)
        # By hand: each completion's k3 KL summed over its tokens, averaged over the 16 completions.
        with torch.no_grad():
            logprobs = rollout_forward(policy(model), rollout)[0]
            ref = rollout_forward(policy(reference.model), rollout)[0]
        by_hand = 0.0
        for row in range(len(rollout.truncated)):
            for t in range(int(rollout.completion_lengths[row])):
                d = float(ref[row, t] - logprobs[row, t])
                by_hand += math.exp(d) - d - 1
        by_hand /= len(rollout.truncated)
    finally:
        handle.remove()
    assert logged[1] == pytest.approx(logged[0], rel=1e-12) and logged[2] == pytest.approx(logged[0], rel=1e-12)
    assert logged[0] == pytest.approx(by_hand, rel=1e-9)


def test_parts_of_a_round_are_the_local_engines_setting(tmp_path):
    """With vLLM each part of a round would load the policy's weights into the engine again (and vLLM bounds its
    own memory): sampling.max_sequences is refused there."""
    from posttrain.errors import ConfigError
    from posttrain.recipes.rl import check_rl_config

    with pytest.raises(ConfigError, match="bounds the local engine's KV cache") as err:
        check_rl_config(grpo_config("unused", tmp_path, "sampling.engine=vllm", "sampling.max_sequences=64"), "grpo")
    assert err.value.field == "sampling.max_sequences"
    check_rl_config(grpo_config("unused", tmp_path, "sampling.max_sequences=64"), "grpo")


def test_k1_as_a_kl_loss_term_is_refused_it_has_no_expected_gradient(tmp_path):
    from posttrain.errors import ConfigError
    from posttrain.recipes.rl import check_rl_config

    with pytest.raises(ConfigError, match="regularises nothing") as err:
        check_rl_config(grpo_config("unused", tmp_path, "kl.coef=0.1", "kl.kind=k1"), "grpo")
    assert err.value.field == "kl.kind"
    for fine in (["kl.coef=0.1", "kl.kind=k1", "kl.placement=reward"], ["kl.coef=0.1", "kl.kind=k2"], ["kl.kind=k1"]):
        check_rl_config(grpo_config("unused", tmp_path, *fine), "grpo")


@pytest.mark.parametrize("capacity,share", [(256, False), (12, False), (256, True), (12, True)])
def test_padding_free_and_padded_forwards_give_the_same_loss_gradient(tiny_model, tokenizer, capacity, share,
                                                                      float64_norms):
    """Padding-free rows (each prompt once per group with `share`, cut to fit 12-token rows) against the
    padded per-sample forward: the reference pass's logprobs and the loss gradient agree in float64."""
    model = tiny_model.double()
    float64_norms(model)
    reference = Reference.frozen_copy(model)
    with torch.no_grad():  # off the reference, so the KL term has a gradient too
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-2)
    source = make_source(model, tokenizer, "train.micro_batch_size=8", "kl.coef=0.2", "kl.placement=loss",
                         f"update.share_prompts={str(share).lower()}", f"update.padding_free_capacity={capacity}",
                         reference=reference)
    handle = eos_bias(model, 4.0)  # some completions end in EOS, the others run into max_new_tokens
    try:
        step = source.next_step()
    finally:
        handle.remove()
    assert 0 < sum(r == "eos" for r in source.last.rollout.finish_reasons) < 16
    rollout = source.last.rollout
    padded_reference = reference.rollout_logprobs(rollout)
    assert_close(source.last.ref_logprobs, padded_reference, rtol=0, atol=1e-12)  # the round's shared pass
    assert source.padding_free == PaddingFree(capacity, share, whole_groups=share)  # the tiny Llama takes the tree
    grads = []
    # groups cut to the capacity (each piece with its copy of the prompt) or whole, and the padded layout
    for layout in (PaddingFree(capacity, share), PaddingFree(capacity, share, whole_groups=True), None):
        laid_out = dataclasses.replace(step, micro_batches=[dataclasses.replace(batch, layout=layout)
                                                            for batch in step.micro_batches])
        grads.append(gradient(model, laid_out, rl_loss_fn(source.cfg, 6)))
    assert grads[0].abs().sum() > 0
    assert_close(grads[0], grads[2], rtol=1e-9, atol=1e-12)
    assert_close(grads[1], grads[2], rtol=1e-9, atol=1e-12)


def test_two_updates_per_round_do_not_depend_on_the_step_batch_object(tiny_model, tokenizer):
    """update.epochs=2 (GRPO's num_iterations): pi_old comes from the step source, before the first update, so the
    second step's loss is the same whether its micro-batches are the objects the source made or copies of them, and
    the loss only reads them."""
    model = tiny_model.double()
    source = make_source(model, tokenizer, "update.epochs=2", "train.micro_batch_size=6")
    first, second = source.next_step(), source.next_step()
    model.eval()  # as the source's pass runs it: in eval mode, no graph (a graph's kernels may round otherwise)
    with torch.no_grad():
        for batch in second.micro_batches:  # pi_old: the policy that sampled, before any update
            assert torch.equal(batch.old_logprobs, rollout_forward(policy(model), batch.rollout,
                                                                   padding_free=source.padding_free)[0])
    model.train()
    untouched = copy.deepcopy(second)
    loss_fn = rl_loss_fn(source.cfg, 6)
    update = gradient(model, first, loss_fn).split([p.numel() for p in model.parameters()])
    with torch.no_grad():  # the first step's update
        for parameter, grad in zip(model.parameters(), update, strict=True):
            parameter.sub_(10.0 * grad.view_as(parameter))
    same, rebuilt = gradient(model, second, loss_fn), gradient(model, copy.deepcopy(second), loss_fn)
    assert same.abs().sum() > 0
    assert torch.equal(same, rebuilt)
    _, metrics = loss_fn(policy(model), second.micro_batches[0], second.normaliser)
    assert metrics["approx_kl"] > 0  # the update moved the policy away from pi_old
    for batch, copied in zip(second.micro_batches, untouched.micro_batches, strict=True):
        for field in ("loss_mask", "advantages", "old_logprobs", "scores", "rows"):
            assert torch.equal(getattr(batch, field), getattr(copied, field)), field


class GroupRecorder:
    """A 0/1 reward that writes down every group of 4 it scores, in order: the completions of prompts whose text
    hashes to 0 mod 3 are always right (no spread), the others score by a hash of their text."""

    def __init__(self) -> None:
        self.groups: list[tuple[list[str], list[float]]] = []
        self.prompts: list[Any] = []

    def __call__(self, batch) -> list[float]:
        values = [1.0 if zlib.crc32(str(p).encode()) % 3 == 0 else float(zlib.crc32(t.encode()) % 2)
                  for p, t in zip(batch.prompts, batch.completions, strict=True)]
        self.groups += [(batch.completions[i:i + 4], values[i:i + 4]) for i in range(0, len(values), 4)]
        self.prompts += batch.prompts[::4]
        return values


def trained_groups(source: RLStepSource) -> list[list[str]]:
    rollout = source.last.rollout
    return [[t for t, g in zip(rollout.texts, rollout.prompt_index.tolist(), strict=True) if g == group]
            for group in range(int(rollout.prompt_index.max()) + 1)]


def test_dynamic_sampling_trains_on_the_first_groups_in_the_band_and_says_what_it_sampled(tiny_model, tokenizer):
    recorder = GroupRecorder()
    source = make_source(tiny_model, tokenizer, "filter.enabled=true", "filter.max_batches=8",
                         rewards=WeightedRewards({"r": (recorder, 1.0)}), size=64)
    step = source.next_step()
    spread = [max(v) > min(v) for _, v in recorder.groups]
    assert not all(spread) and sum(spread) >= 4  # some groups were filtered out, and enough were kept
    assert trained_groups(source) == [texts for (texts, _), s in zip(recorder.groups, spread, strict=True) if s][:4]
    assert len(recorder.groups) % 4 == 0 and sum(spread[:-4]) < 4  # it stopped at the first batch that had enough
    assert step.metrics["sampling_batches"] == len(recorder.groups) // 4
    assert step.metrics["prompts_sampled"] == len(recorder.groups)
    assert step.metrics["kept_fraction"] == sum(spread) / len(spread) and step.metrics["filled_groups"] == 0
    assert step.metrics["sampled_score"] == sum(sum(v) for _, v in recorder.groups) / (4 * len(recorder.groups))
    # The scores and advantages are those of the trained completions: no group trained has zero advantage.
    expected = torch.tensor([float(zlib.crc32(t.encode()) % 2) for t in source.last.rollout.texts], dtype=torch.float64)
    assert_close(source.last.scores, expected)
    assert_close(source.last.advantages[:, 0].double(), group_advantages(expected, source.last.rollout.prompt_index)
                 .to(torch.float32).double())
    assert step.metrics["zero_variance_groups"] == 0.0


def test_dynamic_sampling_fills_a_short_round_with_spread_groups_nearest_the_band(tiny_model, tokenizer):
    recorder = GroupRecorder()
    source = make_source(tiny_model, tokenizer, "filter.enabled=true", "filter.low=2", "filter.high=3",
                         "filter.max_batches=2", rewards=WeightedRewards({"r": (recorder, 1.0)}), size=64)
    step = source.next_step()
    assert len(recorder.groups) == 8  # no group can reach a mean of 2: both batches, then the fill
    order = sorted(range(8), key=lambda i: (max(recorder.groups[i][1]) == min(recorder.groups[i][1]),
                                            2 - sum(recorder.groups[i][1]) / 4))
    assert trained_groups(source) == [recorder.groups[i][0] for i in order[:4]]
    assert step.metrics["kept_fraction"] == 0.0 and step.metrics["filled_groups"] == 4
    assert step.metrics["sampling_batches"] == 2
    # Each trained group keeps its own prompt row (what the SFT blend and the sample records read).
    assert [row["prompt"] for row in source.last.rows] == [recorder.prompts[i] for i in order[:4]]


@pytest.mark.parametrize(("overrides", "field"), [
    (["filter.enabled=true", "sampling.samples_per_prompt=1", "advantage.estimator=reinforce_baseline"],
     "sampling.samples_per_prompt"),
    (["filter.low=0.8", "filter.high=0.2"], "filter.low"),
])
def test_dynamic_sampling_settings_are_checked(tmp_path, overrides, field):
    from posttrain.errors import ConfigError
    from posttrain.recipes.rl import check_rl_config

    cfg = grpo_config("unused", tmp_path, *overrides)
    with pytest.raises(ConfigError) as err:
        check_rl_config(cfg, "grpo")
    assert err.value.field == field


def test_process_supervision_refuses_a_kl_in_the_reward_it_would_not_read(tmp_path):
    from posttrain.errors import ConfigError
    from posttrain.recipes.grpo import check_config

    process = ["advantage.supervision=process", "kl.coef=0.1"]
    with pytest.raises(ConfigError) as err:
        check_config(grpo_config("unused", tmp_path, *process, "kl.placement=reward"))
    assert err.value.field == "kl.placement"
    check_config(grpo_config("unused", tmp_path, *process, "kl.placement=loss"))
    check_config(grpo_config("unused", tmp_path, "kl.coef=0.1", "kl.placement=reward"))  # outcome: in the rewards
    # Dynamic sampling bands groups by final answers: it would drop the all-wrong groups whose steps differ.
    with pytest.raises(ConfigError) as err:
        check_config(grpo_config("unused", tmp_path, "advantage.supervision=process", "filter.enabled=true"))
    assert err.value.field == "filter.enabled"


def test_process_supervision_by_the_verifier_refuses_rows_without_gold_steps(tmp_path, tokenizer):
    """A user's file without a `steps` column trained silently with every step scored 0 against the outcome."""
    from posttrain.data.config import STAGE_FORMATS
    from posttrain.data.pipeline import prepare_data
    from posttrain.errors import DataError
    from posttrain.recipes.rl import check_gold_answers

    path = tmp_path / "chains.jsonl"
    path.write_text(json.dumps({"prompt": "Start with 2. Apply x+3", "answer": "5", "steps": ["5"]}) + "\n"
                    + json.dumps({"prompt": "Start with 4. Apply x*2", "answer": "8"}) + "\n")
    cfg = grpo_config("unused", tmp_path, f"data.source={path}", "reward.task=multistep",
                      "advantage.supervision=process")
    prepared = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS["grpo"])
    with pytest.raises(DataError, match="no gold steps") as err:
        check_gold_answers(prepared.dataset, prepared.tokenized.name, cfg)
    assert (err.value.line, err.value.field) == (2, "steps")
    check_gold_answers(prepared.dataset, prepared.tokenized.name, grpo_config(  # outcome supervision: fine
        "unused", tmp_path, f"data.source={path}", "reward.task=multistep"))


def test_a_run_resumed_from_an_older_checkpoint_keeps_each_steps_reward_errors_once(lm_dir, tmp_path):
    """metrics.jsonl and samples.jsonl were cut back to the checkpoint's step on resume, grader_errors.jsonl was not:
    the errors of the steps trained again were written twice (after a SIGKILL or a crash between checkpoints), and
    nothing in a record said which step it was of."""
    import shutil

    (tmp_path / "flaky.py").write_text("import zlib\n\ndef score(batch):\n    return [float('nan') if "
                                       "zlib.crc32(t.encode()) % 3 == 0 else 1.0 for t in batch.completions]\n")
    settings = ["train.max_steps=4", "train.save_every=1", "train.keep_last=4", "train.batch_size=8",
                "train.micro_batch_size=8", "sampling.samples_per_prompt=4", "reward.max_error_fraction=1",
                f"reward.functions={{{tmp_path / 'flaky.py'}:score: 1.0}}", "eval.problems=0"]
    full = main(grpo_config(lm_dir, tmp_path, *settings))
    shutil.copytree(full.run_dir, tmp_path / "again")
    for later in ("step-3", "step-4"):  # as if killed after step 4, its last checkpoints lost with it
        shutil.rmtree(tmp_path / "again" / "checkpoints" / later)
    shutil.rmtree(tmp_path / "again" / "final")
    (tmp_path / "again" / "summary.json").unlink()
    resumed = main(grpo_config(lm_dir, tmp_path, *settings, "run.name=again", "run.resume=true"))

    def errors(run):
        return [(e["step"], e["row"], e["completion"])
                for e in map(json.loads, (run.run_dir / "grader_errors.jsonl").read_text().splitlines())]

    assert {step for step, _, _ in errors(full)} == {1, 2, 3, 4}
    assert errors(resumed) == errors(full)


def test_step_positions_follow_each_lines_label_not_its_place(tokenizer):
    """step_baseline=position compared the j-th line with the j-th lines of the other completions: one repeated line
    put every later step on the next step's baseline, though the task reads which step each line is."""
    from posttrain.recipes.grpo import OUTCOME_POSITION
    from posttrain.rewards.functions import Completions

    task = get_task("multistep")
    texts = ["a) 7+5=12\na) 7+5=12\nb) 12*3=36\nAnswer: 36", "b) 12*3=36\na) 7+5=12\nAnswer: 36", "12*3=36\nAnswer: 36"]
    rollout = text_rollout([[5, 6]], [texts], tokenizer)
    completions = Completions(prompts=[[{"role": "user", "content": "q"}]] * 3, completions=texts,
                              answers=["36"] * 3, steps=[["12", "36"]] * 3)
    out = ProcessRewards(verifier_step_scorer(task), tokenizer, by_position=True)(
        rollout, completions, torch.tensor([1.0, 1.0, 1.0]))
    positions = [row[mask].tolist() for row, mask in zip(out.step_positions, out.step_mask, strict=True)]
    # labelled lines by their labels (a repeat stays step 0); an unlabelled line by its place
    assert positions == [[0, 0, 1, OUTCOME_POSITION], [1, 0, OUTCOME_POSITION], [0, OUTCOME_POSITION]]
