import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    AdvantageInputs,
    Advantages,
    PolicyLossOutput,
    UnknownNameError,
    gae,
    get_advantage_estimator,
    get_policy_loss,
    group_advantages,
    gspo_policy_loss,
    policy_loss,
    process_advantages,
    register_advantage_estimator,
    register_policy_loss,
    rloo_advantages,
)

MASK = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
SCORES = torch.tensor([1.0, 0.0, 0.5, 0.25])
GROUPS = torch.tensor([0, 1, 0, 1])


def _outcome_inputs(**extra) -> AdvantageInputs:
    # score at the last response token, a small per-token term elsewhere
    last = MASK.cumsum(-1) == MASK.sum(-1, keepdim=True)
    rewards = torch.where(MASK.bool() & last, SCORES.unsqueeze(1), 0.0) + torch.where(MASK.bool(), -0.01, 0.0)
    rewards = rewards.masked_fill(~MASK.bool(), 123.0)  # outside the mask: ignored
    return AdvantageInputs(rewards=rewards, response_mask=MASK, group_ids=GROUPS, **extra)


def test_builtin_names() -> None:
    assert set(ADVANTAGE_ESTIMATORS) == {
        "gae",
        "grpo",
        "grpo_batch_std",
        "dr_grpo",
        "grpo_process",
        "rloo",
        "reinforce_baseline",
    }
    assert set(POLICY_LOSSES) == {"ppo", "gspo"}
    assert get_policy_loss("ppo") is policy_loss and POLICY_LOSSES["gspo"] is gspo_policy_loss


@pytest.mark.parametrize("name,scale", [("grpo", "group"), ("grpo_batch_std", "batch"), ("dr_grpo", "none")])
def test_group_estimators_broadcast_the_sequence_advantage(name: str, scale: str) -> None:
    inputs = _outcome_inputs()
    out = ADVANTAGE_ESTIMATORS[name](inputs, gamma=1.0, lam=1.0, eps=1e-6)
    sequence_scores = SCORES - 0.01 * MASK.sum(-1)
    want = group_advantages(sequence_scores, GROUPS, scale=scale, eps=1e-6).unsqueeze(1) * MASK
    assert isinstance(out, Advantages)
    assert_close(out.advantages, want)
    assert_close(out.returns, want)


def test_rloo_and_reinforce_estimators() -> None:
    inputs = _outcome_inputs()
    sequence_scores = SCORES - 0.01 * MASK.sum(-1)
    rloo = get_advantage_estimator("rloo")(inputs, gamma=1.0, lam=1.0, eps=1e-6)
    assert_close(rloo.advantages, rloo_advantages(sequence_scores, GROUPS).unsqueeze(1) * MASK)
    reinforce = get_advantage_estimator("reinforce_baseline")(inputs, gamma=1.0, lam=1.0, eps=1e-6)
    assert_close(reinforce.advantages, (sequence_scores - sequence_scores.mean()).unsqueeze(1) * MASK)


def test_gae_estimator_is_gae() -> None:
    values = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    inputs = _outcome_inputs(values=values)
    out = get_advantage_estimator("gae")(inputs, gamma=0.9, lam=0.8, eps=1e-6)
    want = gae(inputs.rewards, values, MASK, 0.9, 0.8)
    assert_close(out.advantages, want.advantages)
    assert_close(out.returns, want.returns)


def test_process_estimator_is_process_advantages() -> None:
    steps = {
        "step_rewards": torch.tensor([[1.0, 0.0], [0.5, 0.0], [0.0, 1.0], [1.0, 0.0]]),
        "step_mask": torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]]),
        "step_ends": torch.tensor([[1, 3], [2, 0], [2, 4], [1, 0]]),
    }
    out = get_advantage_estimator("grpo_process")(_outcome_inputs(**steps), gamma=1.0, lam=1.0, eps=1e-6)
    want = process_advantages(*steps.values(), GROUPS, MASK, eps=1e-6)
    assert_close(out.advantages, want)


def test_missing_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="values"):
        get_advantage_estimator("gae")(_outcome_inputs(), gamma=1.0, lam=1.0, eps=1e-6)
    with pytest.raises(ValueError, match="step_rewards, step_mask, step_ends"):
        get_advantage_estimator("grpo_process")(_outcome_inputs(), gamma=1.0, lam=1.0, eps=1e-6)


def test_unknown_name_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'; allowed: dr_grpo, gae, grpo"):
        get_advantage_estimator("ppo")
    with pytest.raises(ValueError, match="allowed: gspo, ppo"):
        POLICY_LOSSES["grpo"]
    with pytest.raises(UnknownNameError) as error:
        ADVANTAGE_ESTIMATORS["nope"]
    assert str(error.value).startswith("unknown advantage estimator 'nope'")
    assert "nope" not in ADVANTAGE_ESTIMATORS and ADVANTAGE_ESTIMATORS.get("nope") is None


def test_registering_new_variants(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ADVANTAGE_ESTIMATORS, "_entries", dict(ADVANTAGE_ESTIMATORS._entries))
    monkeypatch.setattr(POLICY_LOSSES, "_entries", dict(POLICY_LOSSES._entries))

    @register_advantage_estimator("raw_score")
    def raw_score(inputs: AdvantageInputs, *, gamma: float, lam: float, eps: float) -> Advantages:
        return Advantages(inputs.rewards * inputs.response_mask, inputs.rewards * inputs.response_mask)

    @register_policy_loss("plain_pg")
    def plain_pg(logprobs, old_logprobs, advantages, response_mask, **_: object) -> PolicyLossOutput:
        loss = -(advantages * logprobs * response_mask).sum() / response_mask.sum()
        return PolicyLossOutput(loss, torch.zeros(()), torch.zeros(()))

    assert get_advantage_estimator("raw_score") is raw_score
    assert get_policy_loss("plain_pg") is plain_pg
    with pytest.raises(ValueError, match="already registered"):
        register_advantage_estimator("grpo")(raw_score)
