"""Batches of compared responses — preference pairs and rankings — as reward modelling and DPO use them.

Both stages score every response of a comparison in one forward and then need the scores back in
comparison order: `comparison_matrix` turns per-row values [N] of a `collate_pairs` batch (the B
chosen rows, then the B rejected) or a `collate_rankings` batch (every response, best first within
each ranking) into a [B, K] matrix, best first, with a mask for rankings of different sizes. A pair
is a ranking of two, so one loss path can serve both. KTO's unpaired rows travel as pairs too (`collate_unpaired`:
the B rows, then their B mismatched pairs), so the same step source and reference cache serve them.

The step normaliser is the number of comparisons in the whole optimizer step: the losses are means
over comparisons, so a micro-batch's mean times (its comparisons / the step's) adds up to the
step's mean, whatever the micro-batching.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from posttrain.data.collate import ranking_matrix
from posttrain.data.pipeline import Prepared
from posttrain.train.engine import TrainConfig
from posttrain.train.sources import ShuffledStepSource

# Tokenised columns holding each format's sequences (one list per row, or a list of lists).
_SEQUENCE_COLUMNS = {"preference": ("chosen_input_ids", "rejected_input_ids"), "ranking": ("ranked_input_ids",),
                     "unpaired": ("input_ids", "kl_input_ids")}


def comparison_tokens(prepared: Prepared) -> list[int]:
    """Tokens of every row: the lengths of all its compared sequences together (what one forward sees)."""
    columns = [prepared.dataset[c] for c in _SEQUENCE_COLUMNS[prepared.format]]
    if prepared.format == "ranking":
        return [sum(len(ids) for ids in ranked) for ranked in columns[0]]
    return [len(chosen) + len(rejected) for chosen, rejected in zip(*columns, strict=True)]


def comparison_step_source(prepared: Prepared, train: TrainConfig, seed: int,
                           collate: Callable[[list[int]], Any] | None = None) -> ShuffledStepSource:
    """Shuffled steps of preference pairs or rankings; the normaliser is the step's comparison count.

    `collate(indices)` builds a micro-batch (default: the prepared collator over those rows); DPO
    passes one that also attaches the cached reference logprobs of the rows.
    """
    dataset = prepared.dataset
    tokens = comparison_tokens(prepared)

    def count(indices: list[int]) -> tuple[float, int]:
        return float(len(indices)), sum(tokens[i] for i in indices)

    return ShuffledStepSource(len(dataset), train.batch_size, train.micro_batch_size, seed,
                              collate=collate or (lambda idx: prepared.collator([dataset[i] for i in idx])),
                              count=count, rows=prepared.source)


def is_ranking_batch(batch: dict[str, Any]) -> bool:
    return "ranking_ids" in batch


def comparison_matrix(values: Tensor, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Per-row values [N] of a pair or ranking batch -> ([B, K] best first, mask [B, K] of present responses)."""
    if is_ranking_batch(batch):
        return ranking_matrix(values, batch["ranking_ids"], batch["ranks"])
    pairs = values.shape[0] // 2
    matrix = torch.stack([values[:pairs], values[pairs:]], dim=1)
    return matrix, torch.ones_like(matrix, dtype=torch.bool)


def comparison_levels(batch: dict[str, Any], matrix: Tensor) -> Tensor:
    """Each response's level in its comparison, [B, K] like `matrix` (what `comparison_matrix` gave for the
    batch): 0 = best, equal levels = tied (a ranking's equal scores); a pair is [0, 1]."""
    if is_ranking_batch(batch):
        return ranking_matrix(batch["levels"].to(matrix.device), batch["ranking_ids"], batch["ranks"])[0]
    return torch.arange(2, device=matrix.device).expand(matrix.shape[0], 2)


def ordered_pairs(scores: Tensor, mask: Tensor, levels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Score differences s_i - s_j of every ordered response pair (i ranked above j): ([B, K, K], pair mask).

    A preference pair has one ordered pair, chosen above rejected; a ranking of K has K(K-1)/2, less its
    tied pairs where `levels` [B, K] (see `comparison_levels`) states ties: a tie orders nothing.
    """
    present = mask.bool()
    if levels is None:
        above = torch.ones(scores.shape[-1], scores.shape[-1], dtype=torch.bool, device=scores.device).triu(1)
    else:
        above = levels.unsqueeze(-1) < levels.unsqueeze(-2)
    pairs = above & present.unsqueeze(-1) & present.unsqueeze(-2)
    return (scores.unsqueeze(-1) - scores.unsqueeze(-2)) * pairs, pairs


def ordered_pair_accuracy(scores: Tensor, mask: Tensor, levels: Tensor | None = None) -> Tensor:
    """Per comparison, the share of its ordered pairs that the scores order correctly (equal scores are wrong;
    pairs the data ties are not counted): [B].

    For a preference pair: 1 when chosen outscores rejected, else 0.
    """
    differences, pairs = ordered_pairs(scores, mask, levels)
    right = ((differences > 0) & pairs).sum((-1, -2))
    return right.to(scores.dtype) / pairs.sum((-1, -2)).clamp(min=1).to(scores.dtype)


def comparison_accuracy(scores: Tensor, mask: Tensor, levels: Tensor, preference_probs: Tensor | None = None) -> Tensor:
    """Per comparison, the share of its ordered pairs that the scores order correctly: [B] (`ordered_pair_accuracy`).

    Pairs with soft labels (`preference_probs` [B], the share of annotators preferring chosen) count the share of
    annotators who agree with the scores' order: p where chosen outscores rejected, 1 - p where rejected outscores
    chosen, 0 for equal scores. With p = 1 that is the plain accuracy.
    """
    if preference_probs is None:
        return ordered_pair_accuracy(scores, mask, levels)
    p = preference_probs.to(scores.dtype)
    return (scores[:, 0] > scores[:, 1]).to(p.dtype) * p + (scores[:, 0] < scores[:, 1]).to(p.dtype) * (1 - p)


def best_and_others(values: Tensor, mask: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
    """Per comparison, the mean value of its best responses (level 0: the chosen one of a pair, every response
    tied for first in a ranking) and of the others (the rejected one of a pair): ([B], [B])."""
    best = (levels == 0) & mask.bool()
    others = (levels > 0) & mask.bool()

    def mean(where: Tensor) -> Tensor:
        return values.masked_fill(~where, 0.0).sum(-1) / where.sum(-1).clamp(min=1)

    return mean(best), mean(others)


def split_rows(values: Tensor, batch: dict[str, Any]) -> list[Tensor]:
    """Per-sequence values [N] of a pair or ranking batch -> one tensor per comparison (best first)."""
    matrix, mask = comparison_matrix(values, batch)
    return [row[keep] for row, keep in zip(matrix, mask, strict=True)]


def join_rows(rows: Sequence[Tensor], ranking: bool) -> Tensor:
    """The inverse of `split_rows`: per-comparison values -> [N] in the row order of the collated batch
    (rankings: each ranking's responses in turn; pairs: every chosen, then every rejected)."""
    if ranking:
        return torch.cat(list(rows))
    pairs = torch.stack(list(rows))
    return torch.cat([pairs[:, 0], pairs[:, 1]])
