import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from posttrain.algos import (
    aggregate,
    bradley_terry_loss,
    clip_ranges,
    dpo_loss,
    grpo_loss,
    gspo_policy_loss,
    kl_penalty,
    plackett_luce_loss,
    policy_loss,
    sft_loss,
    value_loss,
)

# ---------------------------------------------------------------- aggregation

LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
MASK = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]])


def test_aggregate_each_mode_by_hand() -> None:
    # sequence sums 3, 21, 9; token counts 2, 3, 1
    assert_close(aggregate(LOSS, MASK, "token-mean"), torch.tensor(33.0 / 6))
    assert_close(aggregate(LOSS, MASK, "seq-mean-token-mean"), torch.tensor((1.5 + 7.0 + 9.0) / 3))
    assert_close(aggregate(LOSS, MASK, "seq-mean-token-sum"), torch.tensor(33.0 / 3))
    assert_close(aggregate(LOSS, MASK, "seq-mean-token-sum-norm"), torch.tensor(33.0 / (3 * 4)))
    assert_close(aggregate(LOSS, MASK, "seq-mean-token-sum-norm", max_length=10), torch.tensor(33.0 / 30))
    assert_close(aggregate(LOSS, MASK, "token-mean", normaliser=11), torch.tensor(3.0))
    assert_close(aggregate(LOSS, MASK, "seq-mean-token-sum", normaliser=11), torch.tensor(3.0))


def test_aggregate_unknown_mode_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean"):
        aggregate(LOSS, MASK, "sum")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_global_normaliser_makes_micro_batching_invisible(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    batch, time = 16, 6
    features = torch.randn(batch, time, 3, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, time + 1, (batch,), generator=gen)
    mask = torch.arange(time) < lengths.unsqueeze(1)  # ragged: 1..6 tokens per sequence
    model = torch.nn.Linear(3, 1, dtype=torch.float64)
    normaliser = mask.sum() if mode == "token-mean" else batch

    def accumulated_grad(micro: int) -> torch.Tensor:
        model.zero_grad()
        for start in range(0, batch, micro):
            part = slice(start, start + micro)
            per_token = model(features[part]).squeeze(-1) ** 2
            aggregate(per_token, mask[part], mode, normaliser=normaliser, max_length=time).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    full = accumulated_grad(16)
    assert_close(accumulated_grad(4), full)
    assert_close(accumulated_grad(1), full)
    if mode == "token-mean":  # without the global count, short micro-batches are over-weighted
        model.zero_grad()
        for start in range(0, batch, 4):
            part = slice(start, start + 4)
            (aggregate(model(features[part]).squeeze(-1) ** 2, mask[part], mode) / 4).backward()
        assert not torch.allclose(torch.cat([p.grad.flatten() for p in model.parameters()]), full)


# ---------------------------------------------------------------- likelihood losses


def test_sft_loss_by_hand() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -4.0]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    assert_close(sft_loss(logprobs, mask), torch.tensor(5.75 / 4))
    assert_close(sft_loss(logprobs, mask, normaliser=10), torch.tensor(0.575))
    # weights: rejection sampling keeps only the second completion
    assert_close(sft_loss(logprobs, mask, weights=torch.tensor([0.0, 1.0])), torch.tensor(0.75 / 4))
    assert_close(sft_loss(logprobs, mask, weights=torch.tensor([0.5, 1.0])), torch.tensor(3.25 / 4))


def test_sft_loss_is_cross_entropy_on_answer_tokens() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    logprobs = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    want = F.cross_entropy(logits.flatten(0, 1), labels.masked_fill(mask == 0, -100).flatten())
    assert_close(sft_loss(logprobs, mask), want)


def test_bradley_terry_by_hand() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    want = -(math.log(1 / (1 + math.exp(-1.0))) + math.log(1 / (1 + math.exp(1.0)))) / 2
    assert_close(bradley_terry_loss(chosen, rejected), torch.tensor(want))
    margin = torch.tensor([0.5, 0.0])
    want_margin = -(math.log(1 / (1 + math.exp(-0.5))) + math.log(1 / (1 + math.exp(1.0)))) / 2
    assert_close(bradley_terry_loss(chosen, rejected, margin=margin), torch.tensor(want_margin))


def test_bradley_terry_soft_labels() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0, 0.3]), torch.tensor([1.0, 1.0, 0.3])
    probs = torch.tensor([1.0, 0.8, 0.5])
    assert_close(
        bradley_terry_loss(chosen, rejected, preference_probs=torch.ones(3)), bradley_terry_loss(chosen, rejected)
    )
    terms = []
    for d, p in zip([1.0, -1.0, 0.0], [1.0, 0.8, 0.5], strict=True):
        sig = 1 / (1 + math.exp(-d))
        terms.append(-(p * math.log(sig) + (1 - p) * math.log(1 - sig)))
    assert_close(bradley_terry_loss(chosen, rejected, preference_probs=probs), torch.tensor(sum(terms) / 3))


def test_plackett_luce_with_two_items_is_bradley_terry() -> None:
    scores = torch.randn(5, 2, generator=torch.Generator().manual_seed(2))
    assert_close(plackett_luce_loss(scores), bradley_terry_loss(scores[:, 0], scores[:, 1]))


def test_plackett_luce_with_three_items_is_the_enumerated_probability() -> None:
    s = [0.3, -1.2, 0.8]
    e = [math.exp(x) for x in s]
    # P(1 > 2 > 3) = e1 / (e1 + e2 + e3) * e2 / (e2 + e3)
    probability = e[0] / sum(e) * e[1] / (e[1] + e[2])
    assert_close(plackett_luce_loss(torch.tensor([s])), torch.tensor(-math.log(probability)))


def test_plackett_luce_ragged_rankings() -> None:
    scores = torch.tensor([[0.3, -1.2, 0.8, 5.0], [1.0, 2.0, 7.0, -3.0], [0.5, 0.1, -0.2, 0.4]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    got = plackett_luce_loss(scores, mask)
    want = (
        plackett_luce_loss(scores[0:1, :3]) + plackett_luce_loss(scores[1:2, :2]) + plackett_luce_loss(scores[2:3])
    ) / 3
    assert_close(got, want)
    got.backward()
    assert torch.isfinite(scores.grad).all()
    assert (scores.grad[mask == 0] == 0).all()


def _breslow_by_hand(s: list[float], levels: list[int]) -> float:
    """-log of prod_k exp(s_k) / sum_{j: level_j >= level_k} exp(s_j), one item at a time."""
    total = 0.0
    for k, score in enumerate(s):
        pool = sum(math.exp(x) for x, level in zip(s, levels, strict=True) if level >= levels[k])
        total -= score - math.log(pool)
    return total


@pytest.mark.parametrize("levels", [[0, 0, 1], [0, 1, 1], [0, 0, 0, 1], [0, 1, 1, 2]])
def test_plackett_luce_with_ties_is_breslows_likelihood(levels: list[int]) -> None:
    s = [0.3, -1.2, 0.8, 2.1][:len(levels)]
    e = [math.exp(x) for x in s]
    if levels == [0, 0, 1]:  # a and b tied first: both chosen from {a, b, c}, then c from {c}
        assert _breslow_by_hand(s, levels) == pytest.approx(-math.log(e[0] / sum(e) * e[1] / sum(e)))
    got = plackett_luce_loss(torch.tensor([s], dtype=torch.float64), levels=torch.tensor([levels]))
    assert_close(got, torch.tensor(_breslow_by_hand(s, levels), dtype=torch.float64))


def test_plackett_luce_levels_at_positions_is_the_untied_loss_and_ties_ragged_rows_mix() -> None:
    scores = torch.tensor([[0.3, -1.2, 0.8, 5.0], [1.0, 2.0, 7.0, -3.0], [0.5, 0.1, -0.2, 0.4]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    positions = torch.arange(4).expand(3, 4)
    assert_close(plackett_luce_loss(scores, mask, positions), plackett_luce_loss(scores, mask))
    levels = torch.tensor([[0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 1, 2]])  # an absent item's level is never read
    got = plackett_luce_loss(scores, mask, levels)
    rows = scores.detach().tolist()
    want = (_breslow_by_hand(rows[0][:3], [0, 0, 1]) + _breslow_by_hand(rows[1][:2], [0, 1])
            + _breslow_by_hand(rows[2], [0, 1, 1, 2])) / 3
    assert got.item() == pytest.approx(want, rel=1e-6)
    got.backward()
    assert torch.isfinite(scores.grad).all() and (scores.grad[mask == 0] == 0).all()


# ---------------------------------------------------------------- DPO

BETA = 0.1


def test_dpo_sigmoid_is_ln2_when_the_policy_is_the_reference() -> None:
    logps = torch.tensor([-12.0, -3.5, -40.0])
    rejected = torch.tensor([-9.0, -8.0, -1.0])
    out = dpo_loss(logps, rejected, logps.clone(), rejected.clone(), beta=BETA)
    assert_close(out.loss, torch.tensor(math.log(2)))
    assert (out.chosen_rewards == 0).all() and (out.rejected_rewards == 0).all()


def test_dpo_swapping_chosen_and_rejected_negates_the_gradient() -> None:
    chosen = torch.tensor([-12.0, -3.5], requires_grad=True)
    rejected = torch.tensor([-9.0, -8.0], requires_grad=True)
    ref_c, ref_r = chosen.detach().clone(), rejected.detach().clone()
    grads = torch.autograd.grad(dpo_loss(chosen, rejected, ref_c, ref_r, beta=BETA).loss, (chosen, rejected))
    swapped = torch.autograd.grad(dpo_loss(rejected, chosen, ref_r, ref_c, beta=BETA).loss, (chosen, rejected))
    assert_close(swapped[0], -grads[0])
    assert_close(swapped[1], -grads[1])
    assert_close(grads[0], torch.full((2,), -BETA / 2 / 2))  # -beta * sigmoid(0) / B


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("kind", ["sigmoid", "robust", "hinge", "ipo"])
def test_dpo_variants_by_hand(kind: str) -> None:
    # h = (-10 - -11) - (-9 - -8) = 2 and (-5 - -4) - (-7 - -9) = -3
    chosen, rejected = torch.tensor([-10.0, -5.0]), torch.tensor([-9.0, -7.0])
    ref_c, ref_r = torch.tensor([-11.0, -4.0]), torch.tensor([-8.0, -9.0])
    beta, e = 0.5, 0.1
    per_pair = []
    for h in (2.0, -3.0):
        log_sig, log_sig_neg = math.log(_sigmoid(beta * h)), math.log(_sigmoid(-beta * h))
        per_pair.append(
            {
                "sigmoid": -(1 - e) * log_sig - e * log_sig_neg,
                "robust": (-(1 - e) * log_sig + e * log_sig_neg) / (1 - 2 * e),
                "hinge": max(0.0, 1 - beta * h),
                "ipo": (h - 1 / (2 * beta)) ** 2,
            }[kind]
        )
    out = dpo_loss(chosen, rejected, ref_c, ref_r, beta=beta, kind=kind, label_smoothing=e)
    assert_close(out.loss, torch.tensor(sum(per_pair) / 2))
    assert_close(out.chosen_rewards, torch.tensor([0.5, -0.5]))
    assert_close(out.rejected_rewards, torch.tensor([-0.5, 1.0]))


def test_dpo_errors() -> None:
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge, robust"):
        dpo_loss(x, x, x, x, kind="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, kind="robust", label_smoothing=0.5)


# ---------------------------------------------------------------- policy loss


def test_policy_loss_at_ratio_one() -> None:
    gen = torch.Generator().manual_seed(3)
    logprobs = -torch.rand(3, 5, generator=gen)
    advantages = torch.randn(3, 5, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    out = policy_loss(logprobs, logprobs.clone(), advantages, mask)
    assert_close(out.loss, -advantages[mask.bool()].mean())
    assert out.clip_fraction.item() == 0.0
    assert out.approx_kl.item() == 0.0


def _one_token(ratio: float, advantage: float, **kwargs) -> tuple[float, float, float]:
    """(loss, d loss / d logprob, clip fraction) for a single token."""
    logprob = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    out = policy_loss(
        logprob, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([[advantage]]), torch.ones(1, 1), **kwargs
    )
    out.loss.backward()
    return out.loss.item(), logprob.grad.item(), out.clip_fraction.item()


@pytest.mark.parametrize(
    "ratio,advantage,loss,clipped",
    [
        (1.5, 2.0, -2.0 * 1.2, True),  # A > 0, above 1 + eps: clipped, no gradient
        (1.1, 2.0, -2.0 * 1.1, False),  # A > 0, inside the range
        (0.5, 2.0, -2.0 * 0.5, False),  # A > 0, below 1 - eps: the pessimistic term is the unclipped one
        (1.5, -2.0, 2.0 * 1.5, False),  # A < 0, above 1 + eps: unclipped
        (0.5, -2.0, 2.0 * 0.8, True),  # A < 0, below 1 - eps: clipped, no gradient
    ],
)
def test_policy_loss_hand_cases(ratio: float, advantage: float, loss: float, clipped: bool) -> None:
    got_loss, grad, clip_fraction = _one_token(ratio, advantage)
    assert got_loss == pytest.approx(loss, rel=1e-12)
    assert clip_fraction == float(clipped)
    # d(-A r)/d logp = -A r where unclipped
    assert grad == pytest.approx(0.0 if clipped else -advantage * ratio, rel=1e-12, abs=1e-12)


def test_policy_loss_decoupled_clip_and_dual_clip() -> None:
    assert _one_token(1.25, 1.0)[0] == pytest.approx(-1.2, rel=1e-12)  # symmetric 0.2 clips
    assert _one_token(1.25, 1.0, clip_high=0.28)[0] == pytest.approx(-1.25, rel=1e-12)  # clip-higher does not
    assert _one_token(0.75, -1.0, clip_low=0.1, clip_high=0.28)[0] == pytest.approx(0.9, rel=1e-12)
    # A < 0 and ratio 5: PPO loss 5 * |A|, dual clip caps it at c * |A| = 3 * |A| with no gradient
    assert _one_token(5.0, -1.0)[0] == pytest.approx(5.0, rel=1e-12)
    loss, grad, _ = _one_token(5.0, -1.0, dual_clip=3.0)
    assert loss == pytest.approx(3.0, rel=1e-12) and grad == 0.0
    assert _one_token(2.0, -1.0, dual_clip=3.0)[0] == pytest.approx(2.0, rel=1e-12)  # below the cap
    assert _one_token(5.0, 1.0, dual_clip=3.0)[0] == pytest.approx(-1.2, rel=1e-12)  # A > 0 untouched
    with pytest.raises(ValueError, match="dual_clip"):
        _one_token(1.0, 1.0, dual_clip=1.0)


def test_policy_loss_statistics_by_hand() -> None:
    logprobs = torch.tensor([[math.log(1.5), math.log(0.9), 0.0, 7.0]], dtype=torch.float64)
    old = torch.zeros(1, 4, dtype=torch.float64)
    advantages = torch.tensor([[1.0, 1.0, -1.0, 1.0]], dtype=torch.float64)
    out = policy_loss(logprobs, old, advantages, torch.tensor([[1, 1, 1, 0]]))
    assert_close(out.loss, torch.tensor((-1.2 - 0.9 + 1.0) / 3, dtype=torch.float64))
    assert_close(out.clip_fraction, torch.tensor(1 / 3, dtype=torch.float64))
    # k3 of KL(old || new) = (r - 1) - log r
    approx_kl = ((1.5 - 1 - math.log(1.5)) + (0.9 - 1 - math.log(0.9)) + 0.0) / 3
    assert_close(out.approx_kl, torch.tensor(approx_kl, dtype=torch.float64))


def test_without_clip_settings_each_policy_loss_keeps_its_own_clip_ranges() -> None:
    """The RL recipes passed loss.clip_low's 0.2 to GSPO, whose sequence ratio moves by ~1e-3: never clipped. Unset,
    the ranges are the loss's own; a registered loss that takes them as required arguments still gets PPO's."""
    from posttrain.recipes.rl import RLLossConfig

    cfg = RLLossConfig()
    assert cfg.clip_low is None and cfg.clip_high is None
    assert clip_ranges(gspo_policy_loss, cfg.clip_low, cfg.clip_high) == (3e-4, 4e-4)
    assert clip_ranges(policy_loss, cfg.clip_low, cfg.clip_high) == (0.2, None)
    assert clip_ranges(gspo_policy_loss, None, 0.01) == (3e-4, 0.01)
    assert clip_ranges(gspo_policy_loss, 0.2, None) == (0.2, None)  # given: used (symmetric)

    def required(logprobs, old_logprobs, advantages, response_mask, *, clip_low, clip_high, dual_clip, agg,
                 normaliser, max_length):
        return policy_loss(logprobs, old_logprobs, advantages, response_mask, clip_low=clip_low, clip_high=clip_high)

    assert clip_ranges(required, None, None) == (0.2, None)
    old = torch.full((2, 4), -1.0, dtype=torch.float64)
    logprobs = old + math.log(1.05)  # every sequence ratio 1.05
    advantages = torch.tensor([[1.0] * 4, [-1.0] * 4], dtype=torch.float64)
    mask = torch.ones(2, 4)
    clip = dict(zip(("clip_low", "clip_high"), clip_ranges(gspo_policy_loss, None, None), strict=True))
    out = grpo_loss(logprobs, old, None, advantages, mask, beta=0.0, pg_loss_fn=gspo_policy_loss, **clip)
    assert out.clip_fraction.item() == 0.5  # the positive advantage's ratio clipped at 1 + 4e-4
    out = grpo_loss(logprobs, old, None, advantages, mask, beta=0.0, pg_loss_fn=required)  # grpo_loss's own 0.2
    assert out.clip_fraction.item() == 0.0


def test_gspo_matches_the_sequence_level_objective() -> None:
    gen = torch.Generator().manual_seed(4)
    old = -torch.rand(3, 5, generator=gen, dtype=torch.float64)
    logprobs = (old + 0.1 * torch.randn(3, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    advantages = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64).unsqueeze(1).expand(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    out = gspo_policy_loss(logprobs, old, advantages, mask, clip_low=10.0, clip_high=10.0, agg="seq-mean-token-mean")
    (grad,) = torch.autograd.grad(out.loss, logprobs)
    sequence_ratio = torch.stack(
        [torch.exp((logprobs[b] - old[b])[mask[b].bool()].mean()) for b in range(3)]
    )  # s_i = (pi / pi_old)^(1 / |y_i|)
    want = -(advantages[:, 0] * sequence_ratio).mean()
    (want_grad,) = torch.autograd.grad(want, logprobs)
    assert_close(out.loss, want)
    assert_close(grad, want_grad)


def test_gspo_clips_whole_sequences() -> None:
    old = torch.zeros(2, 2, dtype=torch.float64)
    logprobs = torch.tensor([[0.01, 0.01], [0.0001, -0.0001]], dtype=torch.float64)
    advantages = torch.ones(2, 2, dtype=torch.float64)
    out = gspo_policy_loss(logprobs, old, advantages, torch.ones(2, 2))
    assert_close(out.clip_fraction, torch.tensor(0.5, dtype=torch.float64))
    assert_close(out.loss, torch.tensor(-(1.0004 + 1.0), dtype=torch.float64) / 2)


# ---------------------------------------------------------------- value loss


def test_value_loss_hand_cases() -> None:
    values = torch.tensor([[1.5, 1.1, 0.5, 1.5, 9.0]])
    old_values = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 2.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # V_clipped = 1.2, 1.1, 0.8, 1.2; (V - R)^2 = .25, .81, .25, .25; (V_clipped - R)^2 = .64, .81, .64, .04
    out = value_loss(values, old_values, returns, mask, clip=0.2)
    assert_close(out.loss, torch.tensor(0.5 * (0.64 + 0.81 + 0.64 + 0.25) / 4))
    assert_close(out.clip_fraction, torch.tensor(0.5))
    plain = value_loss(values, old_values, returns, mask, clip=None)
    assert_close(plain.loss, torch.tensor(0.5 * (0.25 + 0.81 + 0.25 + 0.25) / 4))
    assert plain.clip_fraction.item() == 0.0


def test_value_loss_gradient_is_zero_on_the_clipped_side() -> None:
    values = torch.tensor([[1.5, 1.5]], requires_grad=True)
    out = value_loss(values, torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 1.0]]), torch.ones(1, 2), clip=0.2)
    out.loss.backward()
    assert_close(values.grad, torch.tensor([[0.0, 0.5 * 2 * 0.5 / 2]]))


# ---------------------------------------------------------------- GRPO loss


def test_grpo_loss_is_policy_loss_plus_beta_k3() -> None:
    gen = torch.Generator().manual_seed(5)
    old = -torch.rand(2, 4, generator=gen, dtype=torch.float64)
    logprobs = old + 0.3 * torch.randn(2, 4, generator=gen, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(2, 4, generator=gen, dtype=torch.float64)
    advantages = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = grpo_loss(logprobs, old, ref, advantages, mask, beta=0.04, agg="seq-mean-token-mean")
    pg = policy_loss(logprobs, old, advantages, mask, agg="seq-mean-token-mean")
    k3 = torch.exp(ref - logprobs) - (ref - logprobs) - 1
    kl_term = ((k3 * mask).sum(-1) / mask.sum(-1)).mean()
    assert_close(out.loss, pg.loss + 0.04 * kl_term)
    assert_close(out.pg_loss, pg.loss)
    assert_close(out.kl, k3[mask.bool()].mean())
    assert_close(out.clip_fraction, pg.clip_fraction)


def test_grpo_loss_without_reference() -> None:
    logprobs = torch.zeros(1, 3)
    advantages = torch.tensor([[1.0, 2.0, 3.0]])
    out = grpo_loss(logprobs, logprobs, None, advantages, torch.ones(1, 3), beta=0.0)
    assert_close(out.loss, torch.tensor(-2.0))
    assert out.kl.item() == 0.0
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logprobs, logprobs, None, advantages, torch.ones(1, 3), beta=0.1)


def test_grpo_loss_accepts_another_policy_loss() -> None:
    logprobs = torch.tensor([[0.1, -0.1]], dtype=torch.float64)
    old = torch.zeros(1, 2, dtype=torch.float64)
    out = grpo_loss(
        logprobs, old, old, torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2), pg_loss_fn=gspo_policy_loss
    )
    # sequence ratio exp(mean(0.1, -0.1)) = 1: loss = -A, plus beta * mean k3(logp, ref = old)
    assert_close(out.loss, -1 + 0.04 * kl_penalty(logprobs, old, "k3").mean())
