import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import (
    broadcast_to_tokens,
    gae,
    group_advantages,
    process_advantages,
    reinforce_baseline,
    rloo_advantages,
)

# ---------------------------------------------------------------- GAE


def test_gae_hand_example() -> None:
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    values = torch.tensor([[0.0, 0.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])
    out = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert_close(out.advantages, torch.tensor([[0.95, 1.0, 0.0]]))
    assert_close(out.returns, torch.tensor([[0.95, 1.0, 0.0]]))


def _ragged(batch: int, time: int, left_offset: bool, holes: bool, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, time, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, time, generator=gen, dtype=torch.float64)
    mask = torch.zeros(batch, time, dtype=torch.bool)
    for b in range(batch):
        start = int(torch.randint(0, time // 2, (1,), generator=gen)) if left_offset else 0
        end = int(torch.randint(start, time + 1, (1,), generator=gen))
        mask[b, start:end] = True
        if holes:
            mask[b] &= torch.rand(time, generator=gen) > 0.25
    # Garbage where masked: it must not reach any result.
    rewards = rewards.masked_fill(~mask, 1e6)
    values = values.masked_fill(~mask, -1e6)
    return rewards, values, mask


def _gae_loop(rewards, values, mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook GAE on each row's unmasked positions only, episode ending after the last one."""
    advantages = torch.zeros_like(values)
    for b in range(values.shape[0]):
        positions = [t for t in range(values.shape[1]) if mask[b, t]]
        running = 0.0
        for k in reversed(range(len(positions))):
            t = positions[k]
            next_value = float(values[b, positions[k + 1]]) if k + 1 < len(positions) else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            advantages[b, t] = running
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


@pytest.mark.parametrize("left_offset,holes", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7), (0.99, 1.0), (0.95, 0.0)])
def test_gae_matches_a_python_loop_on_ragged_batches(left_offset, holes, gamma, lam) -> None:
    rewards, values, mask = _ragged(5, 9, left_offset, holes, seed=11)
    out = gae(rewards, values, mask, gamma, lam)
    want_advantages, want_returns = _gae_loop(rewards, values, mask, gamma, lam)
    assert_close(out.advantages, want_advantages)
    assert_close(out.returns, want_returns)


def test_gae_lambda_zero_is_the_one_step_td_error() -> None:
    rewards, values, mask = _ragged(4, 8, left_offset=True, holes=False, seed=5)
    out = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    next_values = torch.where(torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1), next_values, 0.0)
    td_error = torch.where(mask, rewards + 0.9 * next_values - values, torch.zeros_like(values))
    assert_close(out.advantages, td_error)


def test_gae_lambda_one_is_the_monte_carlo_return_minus_v() -> None:
    rewards, values, mask = _ragged(4, 8, left_offset=True, holes=False, seed=6)
    gamma = 0.8
    out = gae(rewards, values, mask, gamma=gamma, lam=1.0)
    want = torch.zeros_like(values)
    for b in range(4):
        for t in range(8):
            if mask[b, t]:
                ret = sum(gamma ** (s - t) * float(rewards[b, s]) for s in range(t, 8) if mask[b, s])
                want[b, t] = ret - values[b, t]
    assert_close(out.advantages, want)


def test_gae_passes_no_gradient() -> None:
    values = torch.randn(2, 4, requires_grad=True)
    out = gae(torch.randn(2, 4), values, torch.ones(2, 4), gamma=1.0, lam=0.9)
    assert not out.advantages.requires_grad and not out.returns.requires_grad


# ---------------------------------------------------------------- group baselines


def _group_loop(rewards: torch.Tensor, group_ids: torch.Tensor, scale: str, eps: float, unbiased: bool = True):
    """Per-group mean and std with plain Python statistics, float64."""
    rs = [float(r) for r in rewards]
    ids = [int(g) for g in group_ids]

    def std(xs: list[float]) -> float:
        if len(xs) < 2:
            return 0.0
        mean = sum(xs) / len(xs)
        return (sum((x - mean) ** 2 for x in xs) / (len(xs) - (1 if unbiased else 0))) ** 0.5

    out = []
    for r, g in zip(rs, ids, strict=True):
        members = [x for x, h in zip(rs, ids, strict=True) if h == g]
        centred = r - sum(members) / len(members)
        divisor = {"group": std(members) + eps, "batch": std(rs) + eps, "none": 1.0}[scale]
        out.append(centred / divisor)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_a_loop(scale: str) -> None:
    gen = torch.Generator().manual_seed(3)
    group_ids = torch.tensor([7, 3, 7, 42, 3, 42, 7, 3, 42, 7])
    rewards = torch.rand(10, generator=gen, dtype=torch.float64)
    got = group_advantages(rewards, group_ids, scale=scale, eps=1e-6)
    assert_close(got, _group_loop(rewards, group_ids, scale, 1e-6))


def test_group_advantages_sum_to_zero_per_group() -> None:
    gen = torch.Generator().manual_seed(4)
    group_ids = torch.arange(6).repeat_interleave(8)
    rewards = torch.rand(48, generator=gen)
    got = group_advantages(rewards, group_ids)
    assert_close(got.view(6, 8).sum(-1), torch.zeros(6))


def test_equal_rewards_give_exactly_zero() -> None:
    rewards = torch.tensor([0.1] * 8 + [0.1] * 7 + [1.0])
    group_ids = torch.tensor([0] * 8 + [1] * 8)
    naive = rewards[:8] - rewards[:8].mean()
    assert (naive != 0).any()  # what the float64 / exact-zero handling is for
    for scale in ("group", "batch", "none"):
        got = group_advantages(rewards, group_ids, scale=scale)
        assert (got[:8] == 0).all(), scale
        assert (got[8:15] == got[8]).all(), scale
        assert_close(got[8:].sum(), torch.tensor(0.0))
    assert_close(group_advantages(rewards, group_ids), _group_loop(rewards, group_ids, "group", 1e-6).float())
    assert (rloo_advantages(rewards, group_ids)[:8] == 0).all()
    assert (reinforce_baseline(torch.full((5,), 0.3)) == 0).all()
    assert (group_advantages(rewards[:8], group_ids[:8], eps=0.0) == 0).all()  # 0, not 0 / 0


def test_groups_are_found_by_id_not_position() -> None:
    gen = torch.Generator().manual_seed(5)
    group_ids = torch.arange(4).repeat_interleave(4)
    rewards = torch.rand(16, generator=gen)
    permutation = torch.randperm(16, generator=gen)
    for scale in ("group", "batch", "none"):
        ordered = group_advantages(rewards, group_ids, scale=scale)
        shuffled = group_advantages(rewards[permutation], group_ids[permutation], scale=scale)
        assert_close(shuffled, ordered[permutation])


def test_std_is_unbiased_by_default_and_biased_on_request() -> None:
    rewards = torch.tensor([0.0, 1.0])
    group_ids = torch.tensor([0, 0])
    # unbiased std of {0, 1} = sqrt(0.5), biased = 0.5; centred rewards are -0.5, 0.5
    half_root_two = 0.5 / 0.5**0.5
    assert_close(group_advantages(rewards, group_ids, eps=0.0), torch.tensor([-half_root_two, half_root_two]))
    assert_close(group_advantages(rewards, group_ids, eps=0.0, unbiased=False), torch.tensor([-1.0, 1.0]))


def test_group_of_one_and_integer_rewards() -> None:
    got = group_advantages(torch.tensor([1, 0, 1]), torch.tensor([0, 1, 1]), eps=0.0)
    assert got.dtype == torch.get_default_dtype()
    assert_close(got, torch.tensor([0.0, -(0.5**0.5), 0.5**0.5]))


def test_unknown_scale_is_rejected() -> None:
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(torch.zeros(2), torch.zeros(2), scale="global")


def test_rloo_matches_leave_one_out_loop() -> None:
    gen = torch.Generator().manual_seed(6)
    group_ids = torch.tensor([2, 0, 2, 2, 0, 5])
    rewards = torch.rand(6, generator=gen, dtype=torch.float64)
    want = []
    for i in range(6):
        others = [float(rewards[j]) for j in range(6) if j != i and group_ids[j] == group_ids[i]]
        want.append(float(rewards[i]) - sum(others) / len(others) if others else 0.0)
    assert_close(rloo_advantages(rewards, group_ids), torch.tensor(want, dtype=torch.float64))


def test_reinforce_baseline() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    assert_close(reinforce_baseline(rewards), torch.tensor([0.5, -0.5, 0.0, 0.0]))
    assert_close(reinforce_baseline(rewards, torch.tensor([1.0, 1.0, 0.0, 0.25])), torch.tensor([0.0, -1.0, 0.5, 0.25]))


def test_broadcast_to_tokens() -> None:
    got = broadcast_to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([[0, 1, 1], [1, 1, 0]]))
    assert_close(got, torch.tensor([[0.0, 2.0, 2.0], [-1.0, -1.0, 0.0]]))


# ---------------------------------------------------------------- process supervision


def _process_loop(step_rewards, step_mask, step_ends, group_ids, response_mask, eps, step_positions=None):
    batch, time = response_mask.shape
    position = (lambda b, s: 0) if step_positions is None else (lambda b, s: int(step_positions[b, s]))
    steps = [
        [(float(step_rewards[b, s]), int(step_ends[b, s]), position(b, s))
         for s in range(step_rewards.shape[1]) if step_mask[b, s]]
        for b in range(batch)
    ]
    out = torch.zeros(batch, time, dtype=torch.float64)
    for b in range(batch):
        normalised = []
        for r, end, p in steps[b]:
            pool = [q for c in range(batch) if group_ids[c] == group_ids[b] for q, _, pc in steps[c] if pc == p]
            mean = sum(pool) / len(pool)
            std = (sum((q - mean) ** 2 for q in pool) / (len(pool) - 1)) ** 0.5 if len(pool) > 1 else 0.0
            normalised.append(((r - mean) / (std + eps) if max(pool) > min(pool) else 0.0, end))
        for t in range(time):
            if response_mask[b, t]:
                out[b, t] = sum(value for value, end in normalised if end >= t)
    return out


def _process_batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    batch, time, max_steps = 6, 12, 4
    group_ids = torch.tensor([1, 0, 1, 0, 2, 2])
    response_mask = torch.zeros(batch, time, dtype=torch.bool)
    step_rewards = torch.rand(batch, max_steps, generator=gen, dtype=torch.float64)
    step_mask = torch.zeros(batch, max_steps, dtype=torch.bool)
    step_ends = torch.zeros(batch, max_steps, dtype=torch.long)
    step_counts = [1, 4, 2, 3, 0, 2]  # completions with different step counts, one with none
    for b in range(batch):
        start, end = b % 3, time - (b % 4)  # prompt positions masked out, then right padding
        response_mask[b, start:end] = True
        n = step_counts[b]
        step_mask[b, :n] = True
        ends = torch.randperm(end - start, generator=gen)[:n].sort().values + start
        step_ends[b, :n] = ends
        if n:
            step_ends[b, n - 1] = end - 1  # the last step usually ends at EOS ...
    step_ends[3, :3] = torch.tensor([3, 5, 6])  # ... but not always: tokens 7, 8 after it get 0
    return step_rewards, step_mask, step_ends, group_ids, response_mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_process_advantages_match_a_loop(seed: int) -> None:
    inputs = _process_batch(seed)
    got = process_advantages(*inputs, eps=1e-6)
    assert_close(got, _process_loop(*inputs, eps=1e-6))
    assert (got[3, 7:] == 0).all() and (got[4] == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_process_advantages_with_a_baseline_per_step_position_match_a_loop(seed: int) -> None:
    step_rewards, step_mask, step_ends, group_ids, response_mask = _process_batch(seed)
    gen = torch.Generator().manual_seed(seed)
    step_rewards = torch.randint(0, 2, step_rewards.shape, generator=gen).double()  # 0/1: some positions agree
    positions = torch.arange(step_rewards.shape[1]).expand_as(step_rewards).clone()
    positions[1, 3] = -1  # an outcome step, alone at its position in its group
    got = process_advantages(step_rewards, step_mask, step_ends, group_ids, response_mask, eps=1e-6,
                             step_positions=positions)
    assert_close(got, _process_loop(step_rewards, step_mask, step_ends, group_ids, response_mask, 1e-6, positions))
    assert not torch.equal(got, process_advantages(step_rewards, step_mask, step_ends, group_ids, response_mask,
                                                   eps=1e-6))


def test_process_advantages_by_position_hand_example() -> None:
    # One group of two completions; steps (reward, end, position): A = (1, 1, 0), (0, 3, 1); B = (1, 1, 0),
    # (1, 2, 1). Position 0: both right, 0 each. Position 1: {0, 1}, mean 1/2, unbiased std sqrt(1/2) -> A -k, B k
    # with k = 1/sqrt(2). Summed over the steps ending at or after each token (gamma 1).
    step_rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    step_mask = torch.ones(2, 2)
    step_ends = torch.tensor([[1, 3], [1, 2]])
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    positions = torch.tensor([[0, 1], [0, 1]])
    got = process_advantages(step_rewards, step_mask, step_ends, torch.tensor([5, 5]), response_mask, eps=0.0,
                             step_positions=positions)
    k = 2**-0.5
    assert_close(got, torch.tensor([[-k, -k, -k, -k], [k, k, k, 0.0]]))
    none = process_advantages(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.long),
                              torch.tensor([5, 5]), response_mask, step_positions=torch.zeros(2, 1))
    assert (none == 0).all()  # no step at all


def test_process_advantages_hand_example() -> None:
    # One group of two completions; steps (reward, end): A = (1, 1), (0, 3); B = (1, 2).
    # Pool {1, 0, 1}: mean 2/3, unbiased std sqrt(1/3) -> normalised 1/sqrt(3), -2/sqrt(3), 1/sqrt(3).
    step_rewards = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    step_mask = torch.tensor([[1, 1], [1, 0]])
    step_ends = torch.tensor([[1, 3], [2, 0]])
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    got = process_advantages(step_rewards, step_mask, step_ends, torch.tensor([0, 0]), response_mask, eps=0.0)
    k = 3**-0.5
    assert_close(got, torch.tensor([[-k, -k, -2 * k, -2 * k], [k, k, k, 0.0]]))


def test_process_advantages_discount_later_steps_per_step() -> None:
    # The example above with gamma: A's first step gets k + gamma * (-2k), its second -2k; B's only step k.
    # A third step of A ending with the second (token 3) is summed with it, not discounted.
    step_rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    step_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    step_ends = torch.tensor([[1, 3, 0], [2, 0, 0]])
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    groups = torch.tensor([0, 0])
    k = 3**-0.5
    for gamma, first in ((0.0, k), (0.5, 0.0), (1.0, -k)):
        got = process_advantages(step_rewards, step_mask, step_ends, groups, response_mask, eps=0.0, gamma=gamma)
        assert_close(got, torch.tensor([[first, first, -2 * k, -2 * k], [k, k, k, 0.0]]))
    # Pool {1, 0, 0, 1}: mean 1/2, unbiased std sqrt(1/3) -> A: s, -s, -s; B: s with s = sqrt(3)/2.
    step_mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    step_ends = torch.tensor([[1, 3, 3], [2, 0, 0]])
    got = process_advantages(step_rewards, step_mask, step_ends, groups, response_mask, eps=0.0, gamma=0.0)
    s = 3**0.5 / 2
    assert_close(got, torch.tensor([[s, s, -2 * s, -2 * s], [s, s, s, 0.0]]))


def test_process_advantages_constant_rewards_give_exactly_zero() -> None:
    step_rewards = torch.full((2, 3), 0.1)
    step_ends = torch.tensor([[0, 2, 3], [1, 3, 0]])
    step_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    got = process_advantages(step_rewards, step_mask, step_ends, torch.tensor([4, 4]), torch.ones(2, 4))
    assert (got == 0).all()


def test_process_advantages_reject_step_ends_outside_the_sequence() -> None:
    with pytest.raises(ValueError, match="step_ends"):
        process_advantages(torch.ones(1, 1), torch.ones(1, 1), torch.tensor([[4]]), torch.zeros(1), torch.ones(1, 4))
