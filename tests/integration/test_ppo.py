"""PPO recipe on the tiny model: the first update sees ratio 1 and KL 0; the score lands on the last real token
(left or right padding, pad == eos); per-token rewards and GAE through the recipe are those of `algos`; the value
loss clips exactly when it should; the adaptive controller moves beta the right way; the minibatch loss is
invariant to micro-batching; a run resumes bitwise from a checkpoint taken between rounds."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from posttrain.algos import (
    ADVANTAGE_ESTIMATORS,
    Advantages,
    broadcast_to_tokens,
    gae,
    kl_penalty,
    masked_whiten,
    register_advantage_estimator,
)
from posttrain.config import ModelConfig, load_config
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import prepare_data
from posttrain.errors import ConfigError
from posttrain.models import build_model, load_causal_lm, load_tokenizer, save_pretrained
from posttrain.models.value import ActorCritic, build_value_model
from posttrain.recipes import find_recipe
from posttrain.recipes.ppo import PPOConfig, main, train_ppo
from posttrain.recipes.rl_loop import RLStepSource, rl_loss_fn, rollout_forward, split_by_tokens
from posttrain.rewards.functions import WeightedRewards
from posttrain.rollout import Rollout, RolloutEngine, make_engine
from posttrain.rollout.forward import left_pad
from posttrain.rollout.recompute import PaddingFree, pack_rollout, prompt_keys
from posttrain.train.metrics import read_metrics
from posttrain.train.reference import Reference
from posttrain.train.signals import StoppedInTraining

FAST = ["run.progress=false", "train.save_every=0", "eval.problems=4", "eval.samples=2", "eval.max_new_tokens=4",
        "eval_before=false", "data.size=32", "sampling.max_new_tokens=6", "update.rollout_batch_size=16",
        "train.batch_size=8", "train.micro_batch_size=8"]


@pytest.fixture(scope="module")
def lm_dir(tokenizer, tmp_path_factory):
    model = build_model(ModelConfig(size="tiny"), tokenizer, seed=0)
    return str(save_pretrained(model, tokenizer, tmp_path_factory.mktemp("lm") / "lm"))


def ppo_config(model_dir: str, out, *overrides: str) -> PPOConfig:
    return load_config(PPOConfig, find_recipe("ppo").path, [f"model.path={model_dir}", f"run.out_dir={out}", *FAST,
                                                            *overrides])


def text_score(text: str) -> float:
    return float(sum(text.encode()) % 13) / 13


TEXT_REWARD = WeightedRewards({"text": (lambda batch: [text_score(t) for t in batch.completions], 1.0)})


def perturb(module: torch.nn.Module, scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)


def actor_critic(lm_dir: str, dtype=torch.float32) -> ActorCritic:
    critic = build_value_model(lm_dir, "policy").to(dtype)
    perturb(critic.score, 0.5, seed=1)  # values that are not all 0, so GAE has something to work on
    return ActorCritic(load_causal_lm(lm_dir).to(dtype), critic)


def make_source(model: ActorCritic, tokenizer, *overrides: str, engine=None, reference=None, rewards=TEXT_REWARD,
                size=16) -> RLStepSource:
    cfg = load_config(PPOConfig, None, ["model.path=unused", *FAST, *overrides])
    prepared = prepare_data(DataConfig(source="arith", size=size), tokenizer, accepts=STAGE_FORMATS["ppo"])
    return RLStepSource(cfg, prepared, engine or make_engine("local", model.actor, tokenizer), model, rewards,
                        reference=reference)


def moved_reference(model: ActorCritic) -> Reference:
    """A reference that differs from the actor, so the KL terms are not 0."""
    reference = Reference.frozen_copy(model.actor)
    perturb(reference.model, 0.05, seed=2)
    return reference


def test_a_run_writes_a_complete_run_directory_and_starts_at_ratio_one_and_kl_zero(lm_dir, tmp_path):
    result = main(ppo_config(lm_dir, tmp_path, "train.max_steps=5", "update.epochs=2", "train.micro_batch_size=4",
                             "optim.lr=1e-2", "eval_before=true", "reward.missing_eos_penalty=0.5",
                             "loss.entropy_coef=0.01", "reward.functions.correct=1.0", "reward.functions.format=0.5"))
    metrics = read_metrics(result.run_dir / "metrics.jsonl")
    first = metrics[0]
    # Before the first update: pi = pi_old = pi_ref, so the ratio is 1, nothing is clipped, the KL is 0.
    assert first["kl"] == 0.0 and first["non_score_reward"] == 0.0
    assert first["ratio"] == pytest.approx(1.0, abs=1e-12) and first["clip_fraction"] == 0.0
    assert first["approx_kl"] == 0.0 and first["logprob_mismatch"] < 1e-5
    # One iteration is 2 epochs x 2 minibatches: steps 2-4 reuse the rollout, step 5 samples a new one.
    assert [(m["epoch"], m["minibatch"]) for m in metrics] == [(1, 1), (1, 2), (2, 1), (2, 2), (1, 1)]
    assert [m["generation_s"] > 0 for m in metrics] == [True, False, False, False, True]
    assert metrics[1]["approx_kl"] > 0 and metrics[4]["kl"] != 0
    for key in ("score", "reward", "reward_correct", "reward_format", "accuracy", "kl", "beta", "clip_fraction",
                "value_loss", "value_clip_fraction", "value_explained_variance", "returns", "advantages", "entropy",
                "completion_length", "generation_share", "pg_loss", "grad_norm"):
        assert key in first, key
    truncated = first["truncated"]  # the missing-EOS penalty: score = reward - 0.5 * truncated share
    assert first["score"] == pytest.approx(first["reward"] - 0.5 * truncated)
    rollouts = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    rollouts = [r for r in rollouts if "score" in r]
    assert [r["step"] for r in rollouts] == [1] * 16 + [5] * 16
    assert {"completion", "reward", "rewards", "score", "kl", "finish_reason"} <= set(rollouts[0])
    assert {"accuracy_before", "accuracy", "score", "kl", "steps", "rounds"} <= set(result.summary)
    assert result.summary["rounds"] == 2
    for name in ("config.yaml", "report.md", "plots/curves.png", "final/model.safetensors"):
        assert (result.run_dir / name).is_file(), name
    AutoModelForCausalLM.from_pretrained(result.final_dir, local_files_only=True)


# bf16 autocast over fp32 weights, and bf16 weights (whose pi_old, reference logprobs and values are kept in float32)
@pytest.mark.parametrize("bf16", ["train.precision=bf16", "model.dtype=bfloat16"])
def test_in_bf16_every_forward_is_bf16_the_first_update_has_ratio_one_and_the_sampler_mismatch_is_small(
        lm_dir, tmp_path, bf16):
    result = main(ppo_config(lm_dir, tmp_path, bf16, "train.max_steps=2", "update.epochs=2",
                             "train.micro_batch_size=4", "kl.coef=0.1", "eval_before=true"))
    first = read_metrics(result.run_dir / "metrics.jsonl")[0]
    # pi_old, the reference and the update's forward are the same bf16 forward of the same weights.
    assert first["ratio"] == 1.0 and first["clip_fraction"] == 0.0 and first["kl"] == 0.0
    # The sampler (bf16 KV-cached decode) and the trainer (bf16 full forward) round differently.
    assert 0 < first["logprob_mismatch"] < 0.05
    assert result.summary["device"] == "cpu"  # the suite pins the CPU
    assert result.summary["precision"] == ("bf16" if bf16.startswith("train.") else "fp32")


@pytest.mark.parametrize("split", ["train.micro_batch_size=3", "update.micro_batch_tokens=90"])
def test_the_first_update_of_an_iteration_has_ratio_exactly_one(lm_dir, tokenizer, split):
    model = actor_critic(lm_dir)
    source = make_source(model, tokenizer, split, "kl.coef=0.1", reference=Reference.frozen_copy(model.actor))
    step = source.next_step()
    assert torch.equal(source.last.kl, torch.zeros_like(source.last.kl))
    for batch in step.micro_batches:
        logprobs, _, values = rollout_forward(model, batch.rollout, padding_free=batch.layout)
        assert torch.equal(logprobs, batch.old_logprobs) and torch.equal(values, batch.old_values)


class PadIsEosEngine(RolloutEngine):
    """Fixed completions of different lengths, each ending in EOS and padded with EOS (pad == eos)."""

    def __init__(self, tokenizer, lengths: list[int]) -> None:
        self.tokenizer, self.lengths = tokenizer, lengths

    def update_weights(self, model) -> None:
        pass

    def generate(self, prompts, params, generator=None) -> Rollout:
        eos = self.tokenizer.eos_token_id
        prompt_ids, prompt_mask = left_pad([list(p) for p in prompts], eos)
        width = max(self.lengths)
        completion_ids = torch.full((len(prompts), width), eos)
        response_mask = torch.zeros(len(prompts), width, dtype=torch.long)
        texts = []
        for row in range(len(prompts)):
            length = self.lengths[row % len(self.lengths)]
            completion_ids[row, :length - 1] = 30 + row  # some ordinary token, then EOS
            response_mask[row, :length] = 1
            texts.append(f"{row}" * (length - 1))
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                       response_mask=response_mask, logprobs=torch.zeros(len(prompts), width),
                       finish_reasons=["eos"] * len(prompts), texts=texts,
                       prompt_index=torch.arange(len(prompts)), temperature=1.0)


def test_with_pad_equal_to_eos_the_score_is_read_at_the_real_eos_not_at_padding(lm_dir, tokenizer):
    model = actor_critic(lm_dir)
    lengths = [1, 3, 6, 2]
    source = make_source(model, tokenizer, "kl.coef=0", engine=PadIsEosEngine(tokenizer, lengths))
    source.next_step()
    batch = source.last
    assert bool((batch.rollout.completion_ids[:, -1] == tokenizer.eos_token_id).all())  # every row ends in "pad"
    expected = torch.zeros_like(batch.rewards)
    for row, text in enumerate(batch.rollout.texts):
        expected[row, lengths[row % 4] - 1] = text_score(text)
    assert_close(batch.rewards, expected.to(batch.rewards.dtype))


def test_a_round_whose_every_reward_failed_trains_nothing_and_says_so(lm_dir, tokenizer, caplog):
    """Every completion's reward failed (a grader gone, reward.max_error_fraction=1): the round kept them, scored 0,
    and with a critic's nonzero values GAE's advantages trained the policy on them (trained_fraction 1, silently)."""
    model = actor_critic(lm_dir)
    failing = WeightedRewards({"r": (lambda batch: [float("nan")] * len(batch), 1.0)})
    with caplog.at_level("WARNING"):
        step = make_source(model, tokenizer, rewards=failing).next_step()
    assert step.metrics["failed_rows"] == 16 and step.metrics["trained_fraction"] == 0.0
    assert sum(float(batch.loss_mask.sum()) for batch in step.micro_batches) == 0
    assert "16 whose rewards failed" in caplog.text


def test_per_token_rewards_and_gae_through_the_recipe_match_algos(lm_dir, tokenizer):
    model = actor_critic(lm_dir)
    source = make_source(model, tokenizer, "kl.coef=0.3", "kl.kind=k3", "advantage.gamma=0.9", "advantage.lam=0.7",
                         "train.micro_batch_size=3", reference=moved_reference(model))
    step = source.next_step()
    batch, rollout = source.last, source.last.rollout
    mask = rollout.response_mask
    # Independently: logprobs under the actor and the reference row by row, k3 KL, the score at the last token.
    expected_kl = torch.zeros_like(batch.kl)
    for row in range(len(mask)):
        one = rollout.select([row])
        width = one.completion_ids.shape[1]
        actor_logprobs, _, values = rollout_forward(model, one)
        assert_close(batch.old_values[row, :width], values[0].detach(), rtol=1e-5, atol=1e-5)
        expected_kl[row, :width] = kl_penalty(actor_logprobs[0], source.reference.rollout_logprobs(one)[0], "k3")
    expected_kl *= mask
    assert_close(batch.kl, expected_kl, rtol=1e-4, atol=1e-5)
    assert float(batch.kl.abs().sum()) > 0
    rewards = -0.3 * batch.kl.double() * mask
    length = mask.sum(1)
    for row, text in enumerate(rollout.texts):
        rewards[row, length[row] - 1] += text_score(text)
    assert_close(batch.rewards, rewards)
    advantages, returns = gae(batch.rewards, batch.old_values.double(), mask, gamma=0.9, lam=0.7)
    assert_close(batch.returns, returns.float())
    assert_close(batch.advantages, masked_whiten(advantages, mask).float())
    # Each micro-batch carries its own rows' values.
    for micro in step.micro_batches:
        rows, width = micro.rows, micro.rollout.completion_ids.shape[1]
        assert torch.equal(rows, micro.rollout.prompt_index)  # one completion per prompt: row i completes prompt i
        assert_close(micro.advantages, batch.advantages[rows, :width])
        assert_close(micro.returns, batch.returns[rows, :width])


@pytest.mark.parametrize("value_clip", [None, 0.05])
def test_value_clipping_is_active_only_beyond_the_clip_range(lm_dir, tokenizer, value_clip):
    model = actor_critic(lm_dir)
    source = make_source(model, tokenizer, "kl.coef=0", "loss.vf_coef=1", "advantage.whiten=false",
                         f"loss.value_clip={value_clip if value_clip is not None else 'null'}")
    step = source.next_step()
    micro = step.micro_batches[0]
    old, returns, mask = micro.old_values, micro.returns, micro.loss_mask
    for seed in range(3, 20):  # the critic moved since the rollout until some values are clipped (with a range)
        perturb(model.critic.score, 0.5, seed=seed)
        _, _, values = rollout_forward(model, micro.rollout)
        values = values.detach()
        error = (values - returns).square()
        if value_clip is None:
            per_token, clipped = 0.5 * error, torch.zeros_like(error, dtype=torch.bool)
            break
        clipped_values = torch.minimum(torch.maximum(values, old - value_clip), old + value_clip)
        clipped_error = (clipped_values - returns).square()
        per_token, clipped = 0.5 * torch.maximum(error, clipped_error), clipped_error > error
        if bool((clipped & mask.bool()).any()):
            break
    expected = (per_token * mask).sum() / step.normaliser
    _, metrics = rl_loss_fn(source.cfg, 6)(model, micro, step.normaliser)
    assert metrics["value_loss"] == pytest.approx(expected.item(), rel=1e-5)
    share = (clipped.float() * mask).sum() / mask.sum()
    assert metrics["value_clip_fraction"] == pytest.approx(share.item() * micro.token_share, abs=1e-7)
    assert (share > 0) == (value_clip is not None)


@pytest.mark.parametrize("target, direction", [(1e-6, 1), (1e6, -1)])
def test_the_adaptive_kl_controller_moves_beta_towards_the_target(lm_dir, tokenizer, target, direction):
    model = actor_critic(lm_dir)
    source = make_source(model, tokenizer, "kl.controller=adaptive", "kl.coef=0.1", "kl.horizon=100",
                         f"kl.target={target}", reference=moved_reference(model))
    first = source.next_step()
    assert first.metrics["beta"] == 0.1 and first.metrics["kl"] > 0  # this batch's rewards used the old beta
    # KL above the target raises beta, below lowers it: the clipped error is +-0.2, times 16 samples / 100.
    assert source.kl.beta == pytest.approx(0.1 * (1 + direction * 0.2 * 16 / 100))
    source.queue.clear()
    assert source.next_step().metrics["beta"] == source.last.beta == pytest.approx(0.1 * (1 + direction * 0.032))


def minibatch_gradient(model: ActorCritic, tokenizer, reference: Reference, *overrides: str):
    """The gradient of one minibatch's loss summed over its micro-batches (the Trainer's accumulation), a little
    off pi_old so that ratios and value clipping are not trivial; and its step."""
    source = make_source(model, tokenizer, "kl.coef=0.2", "loss.entropy_coef=0.1", "loss.value_clip=0.01",
                         *overrides, reference=reference)
    step = source.next_step()
    model.zero_grad()
    perturb(model, 1e-3, seed=4)
    loss_fn = rl_loss_fn(source.cfg, 6)
    for micro_batch in step.micro_batches:
        loss, _ = loss_fn(model, micro_batch, step.normaliser)
        loss.backward()
    perturb(model, -1e-3, seed=4)
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), step


# 8 rows in one micro-batch, or in micro-batches of 3, 3 and 2 rows, or of at most 200 token positions each
# (padding-free, packed rows of up to 128 tokens; or padded).
@pytest.mark.parametrize("settings, split", [((), "train.micro_batch_size=3"),
                                             (("update.padding_free_capacity=128",), "update.micro_batch_tokens=200"),
                                             (("update.padding_free=false",), "update.micro_batch_tokens=200")])
def test_the_minibatch_loss_is_invariant_to_micro_batching(lm_dir, tokenizer, settings, split):
    model = actor_critic(lm_dir, dtype=torch.float64)
    reference = moved_reference(model)
    whole, one = minibatch_gradient(model, tokenizer, reference, *settings, "update.micro_batch_tokens=null")
    cut, several = minibatch_gradient(model, tokenizer, reference, *settings, split)
    assert len(one.micro_batches) == 1 and len(several.micro_batches) >= 3
    if split.startswith("update.micro_batch_tokens"):
        for batch in several.micro_batches:  # the positions the forward computes
            padded = "update.padding_free=false" in settings
            layout = batch.rollout.input_ids if padded else pack_rollout(
                batch.rollout, 128, share_prompts=batch.layout.share_prompts,
                whole_groups=batch.layout.whole_groups).input_ids
            assert layout.numel() <= 200
    assert whole.abs().sum() > 0
    assert_close(cut, whole, rtol=1e-9, atol=1e-12)


def test_micro_batches_are_cut_to_the_token_budget():
    # Rows of 4, 7, 2, 5 and 4 real tokens (prompt + completion), left-padded prompts, right-padded completions.
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 1, 1]])
    response_mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]])
    rollout = Rollout(prompt_ids=prompt_mask.clone(), prompt_mask=prompt_mask, completion_ids=response_mask.clone(),
                      response_mask=response_mask, logprobs=torch.zeros(5, 3), finish_reasons=["eos"] * 5,
                      texts=[""] * 5, prompt_index=torch.arange(5), temperature=1.0)
    rows = torch.tensor([1, 3, 4, 0, 2])  # longest first: 7, 5, 4, 4, 2 tokens

    def cut(budget, capacity):
        layout = None if capacity is None else PaddingFree(capacity)
        return [piece.tolist() for piece in split_by_tokens(rows, rollout, budget, layout)]

    assert cut(None, 8) == cut(None, None) == [[1, 3, 4, 0, 2]]
    # Padding-free, rows of 8 tokens: best-fit decreasing packs [1], [3, 2], [4, 0] (widths 7, 7, 8); a
    # micro-batch takes consecutive packed rows while their count x their width fits.
    assert cut(16, 8) == [[1, 3, 2], [4, 0]]            # 2 x 7 = 14; 3 x 8 = 24 does not fit
    assert cut(24, 8) == [[1, 3, 4, 0, 2]]
    assert cut(7, 8) == [[1], [3, 2], [4, 0]]           # [4, 0] (8 > 7) goes alone
    # Padded: rows x (longest prompt + longest completion): [1, 3] costs 2 x (4 + 3) = 14, [3, 4] 2 x (3 + 2) = 10,
    # [3, 4, 0] 3 x (3 + 2) = 15, [0, 2] 2 x (3 + 1) = 8.
    assert cut(12, None) == [[1], [3, 4], [0, 2]]
    assert cut(35, None) == [[1, 3, 4, 0, 2]]           # 5 x (4 + 3)
    assert cut(34, None) == [[1, 3, 4, 0], [2]]         # 4 x 7 = 28; 5 x 7 = 35
    # Shared prompts: rows 3 and 0 have one prompt (3 tokens), laid out once: 3 + 2 + 1 = 6 tokens. Units of
    # 7 [1], 6 [3, 0], 4 [4], 2 [2]: filling rows of 8 gives [1], [3, 0, 2], [4] (3 x 8 = 24 slots), rows of at
    # most 7 give [1], [3, 0], [4, 2] (3 x 7 = 21), the fewer. [1] + [3, 0] cost 2 x 7 = 14 and fit; with [4, 2]
    # 21 does not.
    shared = [piece.tolist() for piece in split_by_tokens(rows, rollout, 16, PaddingFree(8, share_prompts=True))]
    assert shared == [[1, 3, 0], [4, 2]]


@pytest.mark.parametrize("save_every", [3, 6])
def test_a_checkpoint_interval_inside_an_iteration_is_rejected(lm_dir, tmp_path, save_every):
    # One iteration is 2 epochs x 16 / 8 = 4 optimizer steps.
    cfg = ppo_config(lm_dir, tmp_path, "update.epochs=2", f"train.save_every={save_every}")
    with pytest.raises(ConfigError, match=r"2 x 16 / 8 = 4") as err:
        main(cfg)
    assert err.value.field == "train.save_every"


@pytest.mark.parametrize("overrides", [(), ("critic.kind=shared", "adapter.method=lora", "adapter.r=4"),
                                       ("train.precision=bf16",)],
                         ids=["separate-critic", "shared-trunk-lora", "separate-critic-bf16"])
def test_a_run_resumes_bitwise_from_a_checkpoint_between_iterations(lm_dir, tmp_path, overrides, resumes_bitwise):
    settings = ["train.max_steps=4", "update.epochs=1", "train.save_every=2", "optim.lr=1e-2", "kl.coef=0.1",
                "kl.controller=adaptive", "kl.target=0.01", "kl.horizon=50", *overrides]
    full = main(ppo_config(lm_dir, tmp_path, "run.name=full", *settings))
    # Stopped after the first iteration (steps 1-2), resumed from its step-2 checkpoint.
    metrics = resumes_bitwise(full, lambda name: main(ppo_config(lm_dir, tmp_path, f"run.name={name}",
                                                                 "run.resume=true", *settings)))
    assert metrics[2]["beta"] != 0.1  # the controller state came back too


@pytest.mark.parametrize("critic,layout", [("separate", "packed"), ("shared", "packed"), ("separate", "shared-prompts"),
                                           ("shared", "shared-prompts"), ("none", "shared-prompts")])
def test_padding_free_and_padded_forwards_give_the_same_outputs_and_loss_gradient(lm_dir, tokenizer, critic, layout,
                                                                                   float64_norms):
    """Packed rows of 12 tokens, or rows of 40 with the 4 samples of a prompt after one copy of it, against
    the padded per-sample forward: logprobs, entropy, values and the loss gradient agree in float64."""
    model = (actor_critic(lm_dir, torch.float64) if critic == "separate"
             else ActorCritic(load_causal_lm(lm_dir).double(), values=critic == "shared"))
    if critic == "shared":
        perturb(model.value_head, 0.5, seed=1)
    float64_norms(model)
    padding_free = PaddingFree(12) if layout == "packed" else PaddingFree(40, share_prompts=True)
    group = "sampling.samples_per_prompt=" + ("1" if layout == "packed" else "4")
    source = make_source(model, tokenizer, "train.micro_batch_size=8", "update.rollout_batch_size=8",
                         "loss.entropy_coef=0.01", group,
                         *(["critic.kind=none", "advantage.estimator=rloo"] if critic == "none" else []))
    step = source.next_step()
    assert len({int(n) for n in source.last.rollout.prompt_mask.sum(1)}) > 1  # ragged few-shot prompts
    for batch in step.micro_batches:
        packed = rollout_forward(model, batch.rollout, entropy_grad=True, padding_free=padding_free)
        padded = rollout_forward(model, batch.rollout, entropy_grad=True)
        for got, expected in zip(packed, padded, strict=True):
            assert_close(got, expected, rtol=0, atol=1e-10)
        if padding_free.share_prompts:  # the layout holds each prompt once
            keys = prompt_keys(batch.rollout)
            laid_out = pack_rollout(batch.rollout, 40, share_prompts=True).input_ids.numel()
            assert len(set(keys)) < len(keys) and laid_out < pack_rollout(batch.rollout, 40).input_ids.numel()
    grads = []
    # the loss's forward in the micro-batch's layout: this one, with groups kept whole (the models take the prefix
    # tree), and padded
    for layout in (padding_free, dataclasses.replace(padding_free, whole_groups=padding_free.share_prompts), None):
        model.zero_grad()
        for batch in step.micro_batches:
            loss, _ = rl_loss_fn(source.cfg, 6)(model, dataclasses.replace(batch, layout=layout), step.normaliser)
            loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    assert_close(grads[0], grads[2], rtol=1e-9, atol=1e-12)
    assert_close(grads[1], grads[2], rtol=1e-9, atol=1e-12)


def scores_minus_first_value(inputs, *, gamma, lam, eps):
    """A user's estimator: the sequence reward minus the critic's value at the first token (None without one)."""
    scores = (inputs.rewards * inputs.response_mask).sum(-1)
    baseline = inputs.values[:, 0] if inputs.values is not None else scores.mean()
    advantages = broadcast_to_tokens(scores - baseline, inputs.response_mask)
    return Advantages(advantages=advantages, returns=advantages + (inputs.values if inputs.values is not None else 0))


@pytest.fixture()
def registered_estimator():
    """`scores_minus_first_value` registered as a user would, and taken out again afterwards (the registry is
    global: other tests list its names)."""
    register_advantage_estimator("score_minus_first_value")(scores_minus_first_value)
    yield
    del ADVANTAGE_ESTIMATORS._entries["score_minus_first_value"]


@pytest.mark.parametrize("critic", ["separate", "none"])
def test_a_registered_advantage_estimator_is_accepted_by_ppo(lm_dir, tokenizer, tmp_path, critic,
                                                             registered_estimator):
    settings = ["advantage.estimator=score_minus_first_value", f"critic.kind={critic}", "advantage.whiten=false",
                "kl.coef=0"]
    model = actor_critic(lm_dir) if critic == "separate" else ActorCritic(load_causal_lm(lm_dir), values=False)
    source = make_source(model, tokenizer, *settings)
    source.next_step()
    batch, mask = source.last, source.last.rollout.response_mask
    scores = batch.scores.double()
    baseline = batch.old_values[:, 0].double() if critic == "separate" else scores.mean()
    assert_close(batch.advantages.double(), (scores - baseline).unsqueeze(1) * mask, rtol=1e-6, atol=1e-6)
    assert (batch.old_values is not None) == (critic == "separate")
    result = main(ppo_config(lm_dir, tmp_path, *settings, "train.max_steps=2", "update.epochs=1"))
    assert result.summary["advantage"] == "score_minus_first_value" and result.summary["steps"] == 2
    assert result.summary["critic"] == ("separate" if critic == "separate" else "none")


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_the_critic_trains_at_its_own_learning_rate(lm_dir, tmp_path, critic):
    # One optimizer step of AdamW from fresh moments moves a parameter by lr * g / (|g| + eps): by lr wherever its
    # gradient is not tiny, so each group's largest change is its lr.
    cfg = ppo_config(lm_dir, tmp_path, "train.max_steps=1", "update.epochs=1", "update.rollout_batch_size=8",
                     "train.save_every=1", "optim.lr=1e-4", "critic.lr=3e-3", f"critic.kind={critic}")
    result = train_ppo(cfg, stage="ppo", title="PPO", rewards=TEXT_REWARD)  # rewards that differ: gradients
    after = load_file(result.run_dir / "checkpoints" / "step-1" / "model" / "model.safetensors")
    before = load_file(f"{lm_dir}/model.safetensors")

    def largest_change(prefix: str, start: dict[str, torch.Tensor]) -> float:
        return max((after[name] - start[name.removeprefix(prefix)]).abs().max().item()
                   for name in after if name.startswith(prefix) and name.removeprefix(prefix) in start)

    assert largest_change("actor.", before) == pytest.approx(1e-4, rel=1e-3)
    head = "critic.score." if critic == "separate" else "value_head."
    zero_head = {name.removeprefix(head): torch.zeros_like(after[name]) for name in after if name.startswith(head)}
    assert largest_change(head, zero_head) == pytest.approx(3e-3, rel=1e-3)
    if critic == "separate":  # the zero head passes no gradient to the critic's trunk at the first step
        assert largest_change("critic.", before) == 0.0


def test_a_run_resumes_with_another_critic_learning_rate(lm_dir, tmp_path):
    """The optimizer grouped parameters by lr value: setting critic.lr on resume (or giving it optim.lr's value)
    changed the number of groups, and the checkpoint was refused, though README says a resume takes new rates."""
    settings = ["update.epochs=1", "train.save_every=2", "update.rollout_batch_size=8", "train.batch_size=8"]
    first = train_ppo(ppo_config(lm_dir, tmp_path, "train.max_steps=2", *settings), stage="ppo", title="PPO",
                      rewards=TEXT_REWARD)
    assert first.summary["steps"] == 2
    for max_steps, critic_lr in ((3, "1e-3"), (4, "null"), (5, str(load_config(PPOConfig, None, []).optim.lr))):
        resumed = train_ppo(ppo_config(lm_dir, tmp_path, f"train.max_steps={max_steps}", "run.resume=true",
                                       f"critic.lr={critic_lr}", *settings), stage="ppo", title="PPO",
                            rewards=TEXT_REWARD)
        assert resumed.summary["steps"] == max_steps


def test_a_critic_whose_checkpoint_is_not_usable_is_refused_naming_its_setting(lm_dir, tmp_path, chatml_model_dir):
    """A critic of another tokenizer read the policy's ids as other tokens (an IndexError mid-run, or silently); a
    bad critic.path was reported as model.path; critic.kind=shared ignored critic.init and critic.path."""
    from posttrain.recipes.ppo import build_critic, check_config

    with pytest.raises(ConfigError, match="has another tokenizer than the policy") as err:
        build_critic(ppo_config(lm_dir, tmp_path, f"critic.path={chatml_model_dir}"))
    assert err.value.field == "critic.path"
    with pytest.raises(ConfigError, match="no-such-critic does not exist") as err:
        build_critic(ppo_config(lm_dir, tmp_path, f"critic.path={tmp_path / 'no-such-critic'}"))
    assert err.value.field == "critic.path"
    # A critic of an architecture that cannot pack (Bloom: ALiBi along the mask): refused before any sampling, where
    # its first forward failed after the first round was sampled.
    from transformers import BloomConfig, BloomForCausalLM

    tokenizer = load_tokenizer(lm_dir)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4,
                                         pad_token_id=tokenizer.pad_token_id))
    bloom_dir = save_pretrained(bloom, tokenizer, tmp_path / "bloom")
    with pytest.raises(ConfigError, match="cannot take padding-free batches") as err:
        build_critic(ppo_config(lm_dir, tmp_path, f"critic.path={bloom_dir}"))
    assert err.value.field == "update.padding_free"
    assert build_critic(ppo_config(lm_dir, tmp_path, f"critic.path={bloom_dir}", "update.padding_free=false"))
    # Usable: a critic whose tokenizer adds tokens of its own beyond the policy's (same ids for the policy's), and
    # a policy saved as a LoRA adapter (no config.json), from which the critic is built merged.
    from posttrain.models.adapters import AdapterConfig, apply_adapter, save_trained

    extended = load_tokenizer(lm_dir)
    extended.add_tokens(["<extra_token>"])
    extended_dir = save_pretrained(load_causal_lm(lm_dir), extended, tmp_path / "extended")
    assert build_critic(ppo_config(lm_dir, tmp_path, f"critic.path={extended_dir}")) is not None
    lora = AdapterConfig(method="lora", r=4, merge_on_save=False)
    adapter_dir = save_trained(apply_adapter(load_causal_lm(lm_dir), lora), tokenizer, tmp_path / "adapter", lora)
    assert not (adapter_dir / "config.json").exists()
    assert build_critic(ppo_config(str(adapter_dir), tmp_path)) is not None
    for setting, field in (("critic.init=reward_model", "critic.init"), (f"critic.path={lm_dir}", "critic.path")):
        with pytest.raises(ConfigError, match="critic.kind=shared puts a zero-initialised value head") as err:
            check_config(ppo_config(lm_dir, tmp_path, "critic.kind=shared", setting))
        assert err.value.field == field


def test_a_checkpoint_of_another_critic_kind_is_refused_naming_the_critic_settings(lm_dir, tmp_path):
    """A resume with another critic.kind (or a critic-free estimator) listed some forty tensor names."""
    from safetensors.torch import save_file

    from posttrain.train.checkpoint import load_module_weights

    separate = actor_critic(lm_dir)
    save_file({k: v.contiguous() for k, v in separate.state_dict().items()}, str(tmp_path / "model.safetensors"))
    for model, holds in ((ActorCritic(load_causal_lm(lm_dir)), "a value head on the policy's trunk"),
                         (ActorCritic(load_causal_lm(lm_dir), values=False), "no critic")):
        with pytest.raises(ValueError, match=rf"the checkpoint holds a separate critic and this run's model has "
                                             rf"{holds}.*: resume with the critic settings the run was started with "
                                             r"\(critic.kind, advantage.estimator\)"):
            load_module_weights(model, tmp_path)
    load_module_weights(actor_critic(lm_dir), tmp_path)  # the same kind loads


def test_a_shared_value_head_reads_the_hidden_states_the_output_embedding_reads(tokenizer):
    """OPT projects its last hidden states to word_embed_proj_dim: a head of config.hidden_size failed to multiply."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    actor = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=64, word_embed_proj_dim=32,
                                     num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, max_position_embeddings=64,
                                     pad_token_id=tokenizer.pad_token_id))
    model = ActorCritic(actor)
    ids = torch.randint(3, len(tokenizer), (2, 7))
    logits, values = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           position_ids=torch.arange(7).expand(2, 7), keep=5)
    assert model.value_head.in_features == 32 and values.shape == (2, 5) and logits.shape[:2] == (2, 5)


def test_a_stop_inside_a_round_waits_for_its_end_and_the_resumed_run_is_the_uninterrupted_one(
        lm_dir, tmp_path, monkeypatch):
    """A signal inside a round saved a checkpoint there, and the resumed run sampled another round from the updated
    policy: every weight after it differed from the uninterrupted run's (once also every later round sat a step
    off). The stop now waits for the round's last step, and the resumed run is the uninterrupted one, bitwise."""
    import os
    import signal

    import posttrain.recipes.rl_loop as rl_loop

    settings = ["train.max_steps=6", "update.epochs=2", "update.rollout_batch_size=8", "train.batch_size=8",
                "train.save_every=2", "run.log_every=1"]
    calls, make_loss = {"n": 0}, rl_loop.rl_loss_fn

    def stopping_at_step_3(cfg, max_new_tokens):
        loss_fn = make_loss(cfg, max_new_tokens)

        def loss(model, batch, normaliser):
            calls["n"] += 1
            if calls["n"] == 3:  # round 2's first step: it finishes, then the run stops with a checkpoint
                os.kill(os.getpid(), signal.SIGTERM)
            return loss_fn(model, batch, normaliser)
        return loss

    straight = train_ppo(ppo_config(lm_dir, tmp_path / "straight", *settings), stage="ppo", title="PPO",
                         rewards=TEXT_REWARD)
    monkeypatch.setattr(rl_loop, "rl_loss_fn", stopping_at_step_3)
    with pytest.raises(StoppedInTraining) as stopped:
        train_ppo(ppo_config(lm_dir, tmp_path, *settings), stage="ppo", title="PPO", rewards=TEXT_REWARD)
    assert stopped.value.step == 4  # round 2's second step trained first
    monkeypatch.undo()
    resumed = train_ppo(ppo_config(lm_dir, tmp_path, *settings, "run.resume=true"), stage="ppo", title="PPO",
                        rewards=TEXT_REWARD)
    epochs = [(m["step"], m["epoch"]) for m in read_metrics(resumed.run_dir / "metrics.jsonl") if "epoch" in m]
    assert epochs == [(1, 1), (2, 2), (3, 1), (4, 2), (5, 1), (6, 2)]
    assert sorted(p.name for p in (resumed.run_dir / "checkpoints").iterdir()) == ["step-4", "step-6"]
    final, expected = (load_file(str(r.final_dir / "model.safetensors")) for r in (resumed, straight))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
