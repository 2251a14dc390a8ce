"""RFT: PPO with graders. The grader's partial credit is the score at the last token, the critic's loss is
`algos.value_loss` (clipped), and a run logs every grader's scores."""

from __future__ import annotations

import pytest
import torch

from posttrain.algos import value_loss
from posttrain.config import ModelConfig, load_config
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import prepare_data
from posttrain.models import build_model, load_causal_lm, save_pretrained
from posttrain.models.value import ActorCritic, build_value_model
from posttrain.recipes import find_recipe
from posttrain.recipes.ppo import PPOStepSource, ppo_loss_fn, rollout_forward
from posttrain.recipes.rft import RFTConfig, main
from posttrain.recipes.rl import build_rewards
from posttrain.rollout import make_engine
from posttrain.train.metrics import read_metrics

FAST = ["run.progress=false", "train.save_every=0", "eval.problems=4", "eval.max_new_tokens=4", "eval_before=false",
        "data.size=32", "sampling.max_new_tokens=6", "ppo.rollout_batch_size=16", "train.batch_size=8",
        "train.micro_batch_size=8"]


@pytest.fixture(scope="module")
def lm_dir(tokenizer, tmp_path_factory):
    model = build_model(ModelConfig(size="tiny"), tokenizer, seed=0)
    return str(save_pretrained(model, tokenizer, tmp_path_factory.mktemp("lm") / "lm"))


def rft_config(*overrides: str) -> RFTConfig:
    return load_config(RFTConfig, find_recipe("rft").path, [*FAST, *overrides])


def test_rft_scores_with_the_grader_and_its_value_loss_is_algos_value_loss(lm_dir, tokenizer):
    cfg = rft_config(f"model.path={lm_dir}", "ppo.kl_coef=0", "ppo.vf_coef=1", "ppo.value_clip=0.05")
    critic = build_value_model(lm_dir, "policy")
    with torch.no_grad():
        critic.score.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    model = ActorCritic(load_causal_lm(lm_dir), critic)
    prepared = prepare_data(DataConfig(source="arith", size=16), tokenizer, accepts=STAGE_FORMATS["ppo"])
    rewards = build_rewards(cfg.reward, None)
    source = PPOStepSource(cfg.ppo, cfg.sampling, cfg.train, cfg.run.seed, prepared,
                           make_engine("local", model.actor, tokenizer), model, rewards)
    step = source.next_step()
    assert {"reward_grader.exact", "reward_grader.close", "reward_grader.errors"} <= set(step.metrics)
    micro = step.micro_batches[0]
    with torch.no_grad():
        critic.score.weight.add_(0.3)  # the critic moved since the rollout: the clip matters
    _, _, values = rollout_forward(model, micro["rollout"])
    expected = value_loss(values.detach(), micro["values"], micro["returns"], micro["mask"], clip=0.05,
                          normaliser=step.normaliser)
    _, metrics = ppo_loss_fn(cfg.ppo, cfg.sampling.max_new_tokens)(model, micro, step.normaliser)
    assert metrics["value_loss"] == pytest.approx(expected.loss.item(), rel=1e-5)
    assert expected.clip_fraction.item() > 0


def test_rft_run_logs_the_graders(lm_dir, tmp_path):
    result = main(rft_config(f"model.path={lm_dir}", f"run.out_dir={tmp_path}", "train.max_steps=2",
                             "run.log_every=1"))
    metrics = read_metrics(result.run_dir / "metrics.jsonl")
    assert all("reward_grader.exact" in m and "reward_grader.close" in m for m in metrics if "loss" in m)
    assert (result.final_dir / "config.json").is_file() and result.summary["steps"] == 2
