"""Per-token logprobs of the trained tokens of a batch: the one forward every likelihood loss uses."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from posttrain.algos import token_logprobs
from posttrain.models.attention import attention_inputs
from posttrain.models.cpu_attention import sample_tree_keywords
from posttrain.models.heads import forward_keeping, output_head_at

IGNORE_INDEX = -100  # torch's cross-entropy default, and the label of untrained tokens in posttrain.data


def response_logprobs(model: torch.nn.Module, batch: dict[str, Any], temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Logprobs of the tokens marked in `batch["response_mask"]`, and that mask, both [B, K] (a batch of shared
    prompts: [1, N], below).

    The logits at position t predict token t + 1, so targets are the inputs shifted left. Only the
    K positions that predict a trained token in some row are projected to the vocabulary
    (`logits_to_keep`): prompt positions never materialise [B, T, V] logits, which is most of the
    memory and a share of the compute in prompt-heavy batches.

    Batches are those of `posttrain.data.collate` (padded 2-D or packed 4-D attention masks, with
    position_ids restarting per sample; a 4-D mask gets the model's sliding window, `attention_inputs`).
    A batch of shared prompts (`collate_shared_prompts`) names its trained tokens and the states that predict
    them instead (one prompt's last state predicts each of its sequences' first tokens): [1, N] both, in its
    `targets` order.
    """
    if "predictors" in batch:
        return _gathered_logprobs(model, batch, temperature)
    targets_mask = batch["response_mask"][:, 1:].bool()
    keep = predicting_positions(batch)
    logits = forward_keeping(model, keep, **attention_inputs(model, batch), **sample_tree_keywords(model, batch),
                             use_cache=False).logits  # [B, K, V]
    targets = batch["input_ids"][:, keep + 1]
    mask = targets_mask[:, keep]
    logprobs = token_logprobs(logits, targets.masked_fill(~mask, IGNORE_INDEX), temperature=temperature)
    return logprobs, mask.to(logprobs.dtype)


def _gathered_logprobs(model: torch.nn.Module, batch: dict[str, Any], temperature: float) -> tuple[Tensor, Tensor]:
    """`response_logprobs` of a batch that lists its trained tokens (`targets`) and the flat indices of the states
    that predict them (`predictors`): the output head sees those states only (`output_head_at`)."""
    width = batch["input_ids"].shape[1]
    predictors = batch["predictors"]
    with output_head_at(model, predictors // width, predictors % width):
        logits = model(**attention_inputs(model, batch), **sample_tree_keywords(model, batch),
                       use_cache=False).logits  # [1, N, V]
    logprobs = token_logprobs(logits, batch["targets"][None], temperature=temperature)
    return logprobs, torch.ones_like(logprobs)


def predicting_positions(batch: dict[str, Any]) -> Tensor:
    """The K positions t whose token t + 1 is trained in some row: the columns of `response_logprobs`."""
    return batch["response_mask"][:, 1:].bool().any(dim=0).nonzero().squeeze(-1)


def per_sequence_sums(values: Tensor, mask: Tensor, batch: dict[str, Any]) -> Tensor:
    """Sums of `response_logprobs`-shaped values ([B, K], or [1, N] for shared prompts) over each sequence's trained
    tokens.

    Padded batches: one sequence per row, [B]. Packed or padding-free batches: one sum per sample of
    `sample_ids` (a row holds several), [N] in sample order; shared prompts: one per sequence of
    `target_sequences`, [S] in sequence order.
    """
    if "target_sequences" in batch:
        sums = values.new_zeros(len(batch["sequence_ends"]))
        return sums.index_add(0, batch["target_sequences"], (values * mask).reshape(-1))
    if "sample_ids" not in batch:
        return (values * mask).sum(-1)
    sample_ids = batch["sample_ids"][:, predicting_positions(batch) + 1]  # the sample of each target token
    picked = mask.bool()
    sums = values.new_zeros(int(batch["sample_ids"].max()) + 1)
    return sums.index_add(0, sample_ids[picked], values[picked])


def per_sequence_means(values: Tensor, mask: Tensor, batch: dict[str, Any]) -> Tensor:
    """Means of `response_logprobs`-shaped values over each sequence's trained tokens (0 for a sequence
    with none), laid out as `per_sequence_sums`: the per-token average of IPO and of a length-normalised reward."""
    counts = per_sequence_sums(mask.to(values.dtype), mask, batch)
    return per_sequence_sums(values, mask, batch) / counts.clamp(min=1)
