import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import (
    entropy_from_logits,
    masked_mean,
    masked_rescale,
    masked_sum,
    masked_var,
    masked_whiten,
    token_logprobs,
)


def _reference_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits.double() / temperature, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("chunk_elements", [2**25, 40, 7, 1])
def test_token_logprobs_matches_log_softmax_gather(temperature: float, chunk_elements: int) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    got = token_logprobs(logits, labels, temperature=temperature, chunk_elements=chunk_elements)
    assert_close(got, _reference_logprobs(logits, labels, temperature))


def test_token_logprobs_on_a_shifted_view_and_its_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    full = torch.randn(2, 7, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (2, 6), generator=gen)
    got = token_logprobs(full[:, :-1], labels, temperature=0.8, chunk_elements=20)
    (grad,) = torch.autograd.grad(got.sum(), full)
    want = _reference_logprobs(full[:, :-1], labels, 0.8)
    (want_grad,) = torch.autograd.grad(want.sum(), full)
    assert_close(got, want)
    assert_close(grad, want_grad)


def test_token_logprobs_ignore_index_gives_zero() -> None:
    logits = torch.randn(2, 4, 6, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, -100], [0, 5, 3, -100]])
    got = token_logprobs(logits, labels)
    want = _reference_logprobs(logits, labels.clamp(min=0), 1.0).masked_fill(labels == -100, 0.0)
    assert_close(got, want)
    assert (got[labels == -100] == 0).all()


def test_token_logprobs_bf16_is_computed_in_float32() -> None:
    logits = (torch.randn(2, 3, 50) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 3))
    got = token_logprobs(logits, labels, temperature=0.9, chunk_elements=100)
    assert got.dtype == torch.float32
    assert_close(got, _reference_logprobs(logits.float(), labels, 0.9).float())


def test_token_logprobs_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), temperature=0.0)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_entropy_matches_direct_formula(temperature: float) -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 13, generator=gen, dtype=torch.float64) * 2
    probs = torch.softmax(logits / temperature, -1)
    want = -(probs * torch.log(probs)).sum(-1)
    assert_close(entropy_from_logits(logits, temperature=temperature), want)
    assert_close(entropy_from_logits(logits, temperature=temperature, chunk_elements=13), want)


def test_entropy_of_uniform_is_log_v() -> None:
    assert_close(entropy_from_logits(torch.zeros(1, 2, 8)), torch.full((1, 2), math.log(8)))


def test_masked_sum_and_mean_by_hand() -> None:
    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_sum(values, mask).item() == 13.0
    assert_close(masked_sum(values, mask, dim=-1), torch.tensor([3.0, 10.0]))
    assert masked_mean(values, mask).item() == 13.0 / 4
    assert_close(masked_mean(values, mask, dim=-1), torch.tensor([1.5, 5.0]))
    assert_close(masked_mean(values, mask, normaliser=10), torch.tensor(1.3))
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_masked_sum_keeps_nan_out_of_the_gradient() -> None:
    values = torch.tensor([1.0, float("nan"), 3.0], requires_grad=True)
    masked_sum(values, torch.tensor([True, False, True])).backward()
    assert_close(values.grad, torch.tensor([1.0, 0.0, 1.0]))


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_torch_var_of_the_selected_values(unbiased: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=gen) > 0.4
    want = values[mask].var(correction=1 if unbiased else 0)
    assert_close(masked_var(values, mask, unbiased=unbiased), want)


def test_masked_var_of_a_single_value_is_zero() -> None:
    values = torch.tensor([[3.0, 5.0]])
    assert masked_var(values, torch.tensor([[1, 0]])).item() == 0.0


def test_masked_whiten() -> None:
    gen = torch.Generator().manual_seed(4)
    values = torch.randn(3, 5, generator=gen, dtype=torch.float64) * 3 + 2
    mask = torch.rand(3, 5, generator=gen) > 0.3
    selected = values[mask]
    want = torch.zeros_like(values)
    want[mask] = (selected - selected.mean()) / torch.sqrt(selected.var() + 1e-8)
    assert_close(masked_whiten(values, mask), want)
    kept_mean = masked_whiten(values, mask, shift_mean=False)
    want[mask] = want[mask] + selected.mean()
    assert_close(kept_mean, want)
    want[mask] = selected / torch.sqrt(selected.var() + 1e-8)  # the std alone: zeros stay zeros
    assert_close(masked_rescale(values, mask), want)
