"""RFT: PPO with graders. The grader's partial credit is the score at the last token, the critic's loss is
`algos.value_loss` (clipped), and a run logs every grader's scores. Critic-free group baselines: no critic is
built, the advantages are the group baselines of score - beta * KL computed by hand, and the loss is the clipped
surrogate alone. The SFT blend adds alpha times the gold answers' NLL, computed token by token."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import value_loss
from posttrain.config import ModelConfig, load_config
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import prepare_data
from posttrain.errors import ConfigError
from posttrain.models import build_model, count_parameters, load_causal_lm, save_pretrained
from posttrain.models.value import ActorCritic, build_value_model
from posttrain.recipes import find_recipe
from posttrain.recipes.rft import RFTConfig, main
from posttrain.recipes.rl import GoldAnswers, build_rewards
from posttrain.recipes.rl_loop import RLStepSource, rl_loss_fn, rollout_forward
from posttrain.rollout import make_engine
from posttrain.train.metrics import read_metrics
from posttrain.train.reference import Reference

FAST = ["run.progress=false", "train.save_every=0", "eval.problems=4", "eval.max_new_tokens=4", "eval_before=false",
        "data.size=32", "sampling.max_new_tokens=6", "update.rollout_batch_size=16", "train.batch_size=8",
        "train.micro_batch_size=8"]


@pytest.fixture(scope="module")
def lm_dir(tokenizer, tmp_path_factory):
    model = build_model(ModelConfig(size="tiny"), tokenizer, seed=0)
    return str(save_pretrained(model, tokenizer, tmp_path_factory.mktemp("lm") / "lm"))


def rft_config(*overrides: str) -> RFTConfig:
    return load_config(RFTConfig, find_recipe("rft").path, [*FAST, *overrides])


def rft_source(cfg: RFTConfig, model: ActorCritic, tokenizer, reference: Reference | None = None,
               gold: bool = False) -> RLStepSource:
    prepared = prepare_data(DataConfig(source="arith", size=16), tokenizer, accepts=STAGE_FORMATS["ppo"])
    return RLStepSource(cfg, prepared, make_engine("local", model.actor, tokenizer), model,
                        build_rewards(cfg.reward, None), reference=reference,
                        gold=GoldAnswers(tokenizer, cfg.data) if gold else None)


def test_rft_scores_with_the_grader_and_its_value_loss_is_algos_value_loss(lm_dir, tokenizer):
    cfg = rft_config(f"model.path={lm_dir}", "kl.coef=0", "loss.vf_coef=1", "loss.value_clip=0.05")
    critic = build_value_model(lm_dir, "policy")
    with torch.no_grad():
        critic.score.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    model = ActorCritic(load_causal_lm(lm_dir), critic)
    prepared = prepare_data(DataConfig(source="arith", size=16), tokenizer, accepts=STAGE_FORMATS["ppo"])
    rewards = build_rewards(cfg.reward, None)
    source = RLStepSource(cfg, prepared, make_engine("local", model.actor, tokenizer), model, rewards)
    step = source.next_step()
    assert {"reward_grader.exact", "reward_grader.close", "reward_grader.errors"} <= set(step.metrics)
    micro = step.micro_batches[0]
    with torch.no_grad():
        critic.score.weight.add_(0.3)  # the critic moved since the rollout: the clip matters
    _, _, values = rollout_forward(model, micro.rollout)
    expected = value_loss(values.detach(), micro.old_values, micro.returns, micro.loss_mask, clip=0.05,
                          normaliser=step.normaliser)
    _, metrics = rl_loss_fn(cfg, cfg.sampling.max_new_tokens)(model, micro, step.normaliser)
    assert metrics["value_loss"] == pytest.approx(expected.loss.item(), rel=1e-5)
    assert expected.clip_fraction.item() > 0


def test_rft_run_logs_the_graders(lm_dir, tmp_path):
    result = main(rft_config(f"model.path={lm_dir}", f"run.out_dir={tmp_path}", "train.max_steps=2",
                             "run.log_every=1"))
    metrics = read_metrics(result.run_dir / "metrics.jsonl")
    assert all("reward_grader.exact" in m and "reward_grader.close" in m for m in metrics if "loss" in m)
    assert (result.final_dir / "config.json").is_file() and result.summary["steps"] == 2


def by_hand_baselines(rewards: torch.Tensor, groups: torch.Tensor, estimator: str) -> torch.Tensor:
    out = torch.zeros_like(rewards)
    for group in groups.unique():
        rows = (groups == group).nonzero().flatten()
        r = rewards[rows]
        if estimator == "grpo":  # (r - group mean) / (group std + eps), Bessel-corrected std
            out[rows] = (r - r.mean()) / (r.std() + 1e-6)
        else:  # rloo: r minus the mean of the group's other rewards
            out[rows] = r - (r.sum() - r) / (len(r) - 1)
    return out


# Whitened under a group baseline: scaled by the round's std over the completion tokens, not re-centred (a tied
# group keeps advantage 0).
@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_critic_free_advantages_are_group_baselines_of_score_minus_beta_kl(lm_dir, tokenizer, estimator, whiten):
    model = ActorCritic(load_causal_lm(lm_dir), values=False)
    assert not model.has_values and count_parameters(model) == count_parameters(model.actor)
    reference = Reference.frozen_copy(model.actor)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term is not 0
        for parameter in reference.model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    cfg = rft_config(f"model.path={lm_dir}", f"advantage.estimator={estimator}", f"advantage.whiten={whiten}",
                     "sampling.samples_per_prompt=4", "kl.coef=0.2")
    source = rft_source(cfg, model, tokenizer, reference=reference)
    step = source.next_step()
    batch, mask = source.last, source.last.rollout.response_mask
    assert batch.kl.abs().sum() > 0 and len(batch.rollout.prompt_index.unique()) == 4
    sequence = batch.scores.double() - 0.2 * batch.kl.double().sum(1)
    expected = by_hand_baselines(sequence, batch.rollout.prompt_index, estimator).unsqueeze(1) * mask
    if whiten:
        expected = expected / torch.sqrt(expected[mask.bool()].var() + 1e-8)
    assert_close(batch.advantages.double(), expected, rtol=1e-5, atol=1e-6)
    # The loss is the clipped surrogate alone: no value term.
    loss, metrics = rl_loss_fn(cfg, cfg.sampling.max_new_tokens)(model, step.micro_batches[0], step.normaliser)
    assert "value_loss" not in metrics and loss.item() == metrics["pg_loss"]


def test_a_critic_free_run_builds_no_critic(lm_dir, tmp_path, monkeypatch):
    def no_critic(*args, **kwargs):
        raise AssertionError("a critic was built")

    monkeypatch.setattr("posttrain.recipes.ppo.build_value_model", no_critic)
    result = main(rft_config(f"model.path={lm_dir}", f"run.out_dir={tmp_path}", "train.max_steps=1", "update.epochs=1",
                             "advantage.estimator=rloo", "sampling.samples_per_prompt=4"))
    assert result.summary["critic"] == "none"
    assert result.summary["trainable_parameters"] == count_parameters(load_causal_lm(lm_dir))
    [record] = read_metrics(result.run_dir / "metrics.jsonl")
    assert "value_loss" not in record and "values" not in record


def test_the_sft_blend_adds_alpha_times_the_gold_answers_token_mean_nll(lm_dir, tokenizer):
    model = ActorCritic(load_causal_lm(lm_dir), build_value_model(lm_dir, "policy"))
    cfg = rft_config(f"model.path={lm_dir}", "loss.sft_coef=0.5", "sampling.samples_per_prompt=2",
                     "train.batch_size=6", "train.micro_batch_size=3")
    source = rft_source(cfg, model, tokenizer, gold=True)
    step = source.next_step()
    blended_fn = rl_loss_fn(cfg, cfg.sampling.max_new_tokens)
    plain_fn = rl_loss_fn(dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, sft_coef=0.0)),
                          cfg.sampling.max_new_tokens)
    difference, prompts = 0.0, set()
    for micro in step.micro_batches:  # 6 completions (2 per prompt) in micro-batches of 3: a prompt spans both
        blended, _ = blended_fn(model, micro, step.normaliser)
        plain, _ = plain_fn(model, micro, step.normaliser)
        without_gold, _ = plain_fn(model, dataclasses.replace(micro, sft=None), step.normaliser)
        assert torch.equal(plain, without_gold)  # alpha = 0: the loss of before
        difference += (blended - plain).item()
        prompts |= set(micro.rollout.prompt_index.tolist())
    # Independently: after the exact prompt tokens the policy samples from, the answer's tokens and EOS.
    nll, tokens = 0.0, 0
    for prompt in prompts:
        row = source.last.rows[prompt]
        target = tokenizer.encode(row["answer"], add_special_tokens=False) + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model.actor(input_ids=torch.tensor([row["prompt_input_ids"] + target])).logits[0].double()
        logprobs = logits[len(row["prompt_input_ids"]) - 1:-1].log_softmax(-1)
        nll -= logprobs.gather(-1, torch.tensor(target).unsqueeze(1)).sum().item()
        tokens += len(target)
    assert len(prompts) < 8  # some prompt has both its completions here: its gold answer counts once
    assert difference == pytest.approx(0.5 * nll / tokens, rel=1e-5)


def test_raising_grader_stops_the_run_with_its_traceback_and_keeps_every_error(lm_dir, tmp_path, capsys):
    grader = tmp_path / "broken.yaml"
    grader.write_text('type: python\nsource: "def grade(sample, item):\\n    return 1 / 0\\n"\n')
    with pytest.raises(ConfigError, match=r"reward.functions.grader: .* are errors .*ZeroDivisionError"):
        main(rft_config(f"model.path={lm_dir}", f"run.out_dir={tmp_path}", "train.max_steps=2",
                        f"reward.grader={grader}"))
    err = capsys.readouterr().err
    assert "ZeroDivisionError: division by zero" in err and "Traceback" in err and "completion:" in err
    errors = [json.loads(line) for line in next(tmp_path.rglob("grader_errors.jsonl")).read_text().splitlines()]
    assert errors and all(e["function"] == "grader" and "ZeroDivisionError" in e["error"] for e in errors)
    assert all(isinstance(e["completion"], str) for e in errors)


def test_a_grader_reading_the_answer_of_prompt_only_rows_fails_at_start_up(lm_dir, tmp_path):
    """It compared every completion with the text "None" (reward 0, no error, no warning)."""
    grader = tmp_path / "eq.yaml"
    grader.write_text('type: string_check\noperation: eq\ninput: "{{ sample.output_text }}"\n'
                      'reference: "{{ item.answer }}"\n')
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "solution": str(i + 1)}) + "\n"
                            for i in range(8)))
    with pytest.raises(ConfigError, match=r"eq.yaml:4: reference: item.answer has no value in any row of the data"):
        main(rft_config(f"model.path={lm_dir}", f"run.out_dir={tmp_path}", "train.max_steps=2",
                        f"reward.grader={grader}", f"data.source={data}"))
    assert not list(tmp_path.rglob("metrics.jsonl"))


def test_template_typo_fails_at_start_up(lm_dir, tmp_path):
    grader = tmp_path / "typo.yaml"
    grader.write_text('type: string_check\noperation: eq\ninput: "{{ sample.output_txt }}"\n'
                      'reference: "{{ item.answer }}"\n')
    with pytest.raises(ConfigError, match=r"typo.yaml:3: input: sample.output_txt does not exist"):
        main(rft_config(f"model.path={lm_dir}", f"run.out_dir={tmp_path}", "train.max_steps=2",
                        f"reward.grader={grader}"))
    assert not list(tmp_path.rglob("metrics.jsonl"))
