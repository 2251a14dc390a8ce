"""Token log-probabilities, entropies and masked statistics.

Conventions: ``logits`` are ``[B, T, V]`` and already aligned with ``labels`` ``[B, T]``
(``logits[b, t]`` is the distribution that predicts ``labels[b, t]``; the caller does the
usual one-position shift). Masks are ``[B, T]`` with 1 (or True) on the positions that count.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

# A [B, T, V] tensor is processed in pieces of at most this many elements, so the float32
# working copies (upcast from bf16, divided by the temperature, exponentiated) stay bounded:
# 2**25 fp32 elements = 128 MiB, against e.g. 8 x 4096 x 152k = 20 GiB for a whole batch.
CHUNK_ELEMENTS = 2**25


def _chunks(logits: Tensor, chunk_elements: int) -> Iterator[tuple[slice, slice]]:
    """Yield (batch slice, time slice) pairs covering [B, T] in row-major pieces of bounded size.

    Slicing B and T (never reshaping) keeps every piece a view: ``logits[:, :-1]`` is not
    viewable as [B * T, V], so a flattening reshape would copy the whole tensor.
    """
    batch, time, vocab = logits.shape
    t_step = max(1, min(time, chunk_elements // max(vocab, 1)))
    b_step = max(1, chunk_elements // max(t_step * vocab, 1)) if t_step == time else 1
    for b0 in range(0, batch, b_step):
        for t0 in range(0, time, t_step):
            yield slice(b0, b0 + b_step), slice(t0, t0 + t_step)


def _working(chunk: Tensor, temperature: float) -> Tensor:
    """Upcast low-precision logits (bf16/fp16 logsumexp loses ~3 digits) and apply the temperature."""
    if chunk.dtype in (torch.float16, torch.bfloat16):
        chunk = chunk.float()
    return chunk if temperature == 1.0 else chunk / temperature


def _stitch(pieces: list[list[Tensor]], logits: Tensor) -> Tensor:
    if not pieces:  # B == 0 or T == 0
        dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        return logits.new_zeros(logits.shape[:-1], dtype=dtype)
    return torch.cat([torch.cat(row, dim=1) for row in pieces], dim=0)


def _check_logits(logits: Tensor, temperature: float) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Tensor:
    """Log-probability of each label under the (temperature-scaled) softmax of the logits.

    logprobs[b, t] = z[b, t, labels[b, t]] - logsumexp_v z[b, t, v],   z = logits / temperature

    Equal to ``log_softmax(z).gather(-1, labels)`` without materialising the [B, T, V]
    log-softmax: the label logit is gathered and the logsumexp is computed chunk by chunk
    (``chunk_elements`` at a time) in float32 for bf16/fp16 inputs. The temperature must be the
    one the sampler used, or the ratio to the sampler's logprobs is biased.

    Shapes: logits [B, T, V], labels [B, T] (int) -> logprobs [B, T], float32 for low-precision
    logits, else the logits' dtype. Positions where ``labels == ignore_index`` get 0.
    Source: the softmax policy of a causal LM; temperature as in the sampler.
    """
    _check_logits(logits, temperature)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match logits[..., 0] {tuple(logits.shape[:-1])}")
    ignored = labels == ignore_index
    safe_labels = labels.masked_fill(ignored, 0)
    pieces: list[list[Tensor]] = []
    for b, t in _chunks(logits, chunk_elements):
        if t.start == 0:
            pieces.append([])
        z = _working(logits[b, t], temperature)
        picked = z.gather(-1, safe_labels[b, t].unsqueeze(-1)).squeeze(-1)
        pieces[-1].append(picked - torch.logsumexp(z, dim=-1))
    logprobs = _stitch(pieces, logits)
    return logprobs.masked_fill(ignored, 0.0)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0, chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """Entropy of the (temperature-scaled) softmax at every position.

    H[b, t] = -sum_v p_v log p_v = logsumexp(z) - sum_v softmax(z)_v * z_v,   z = logits / temperature

    The second form needs one softmax, not a softmax and a log-softmax. Computed chunk by chunk
    (float32 for low-precision logits), like ``token_logprobs``.

    Shapes: logits [B, T, V] -> entropy [B, T].
    Source: Shannon entropy; the entropy bonus of PPO (Schulman et al. 2017, eq. 9).
    """
    _check_logits(logits, temperature)
    pieces: list[list[Tensor]] = []
    for b, t in _chunks(logits, chunk_elements):
        if t.start == 0:
            pieces.append([])
        z = _working(logits[b, t], temperature)
        pieces[-1].append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1))
    return _stitch(pieces, logits)


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum_{i : mask_i = 1} values_i, over all elements (dim=None) or along ``dim``.

    Masked-out positions are dropped with ``where``, not multiplied by 0, so an inf or NaN there
    (e.g. the ratio of a padding token) cannot leak into the sum or its gradient.

    Shapes: values and mask broadcastable, typically [B, T]; returns a scalar or the reduced shape.
    Source: standard masking for padded sequence batches.
    """
    kept = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(
    values: Tensor, mask: Tensor, dim: int | None = None, normaliser: float | Tensor | None = None
) -> Tensor:
    """Mean over the masked positions: sum(values * mask) / N.

    N = ``normaliser`` if given, else the number of masked positions (clamped to >= 1, so an
    empty mask gives 0, not NaN). With gradient accumulation pass N = the token count of the
    whole accumulated batch: the micro-batch means then add up to the full-batch mean.

    Shapes: values, mask [B, T] -> scalar (dim=None) or the reduced shape.
    Source: global token normalisation, as in "all-reduce the token count" loss scaling.
    """
    total = masked_sum(values, mask, dim)
    if normaliser is None:
        normaliser = masked_sum(torch.ones_like(values), mask, dim).clamp(min=1)
    return total / normaliser


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over the masked positions.

    var = sum(mask * (x - mean)^2) / (n - 1)   (unbiased, Bessel) or / n (biased),
    n = number of masked positions; with n < 2 the unbiased variance is undefined and 0 is
    returned (a single value has no spread).

    Shapes: values, mask [B, T] -> scalar.
    Source: as ``masked_var`` in TRL / verl (unbiased by default).
    """
    mean = masked_mean(values, mask)
    count = masked_sum(torch.ones_like(values), mask)
    squares = masked_sum((values - mean) ** 2, mask)
    if unbiased:
        return torch.where(count > 1, squares / (count - 1).clamp(min=1), torch.zeros_like(squares))
    return squares / count.clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise to zero mean and unit variance over the masked positions.

    whitened = (x - mean) / sqrt(var + eps)   (+ mean again if ``shift_mean`` is False)

    mean and var (unbiased) are taken over the masked positions only; masked-out positions
    are set to 0 so they cannot carry a spurious advantage.

    Shapes: values, mask [B, T] -> [B, T].
    Source: advantage whitening in PPO implementations (Huang et al. 2022, "The 37
    implementation details of PPO", detail 7).
    """
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def masked_rescale(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale to unit variance over the masked positions, without centring.

    rescaled = x / sqrt(var + eps)

    var (unbiased) over the masked positions only; masked-out positions are set to 0. For advantages already
    centred per group (a group baseline): the round's scale changes, each group's centring does not, and a group
    whose advantages are all 0 keeps 0, where subtracting the round's mean would move it.

    Shapes: values, mask [B, T] -> [B, T].
    Source: the standard-deviation half of ``masked_whiten``.
    """
    rescaled = values * torch.rsqrt(masked_var(values, mask) + eps)
    return torch.where(mask.bool(), rescaled, torch.zeros_like(rescaled))
