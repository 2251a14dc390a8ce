"""Tokenised samples -> batches: padded (right for training, left for generation), padding-free, packed.

Every training batch carries `labels` (input ids, -100 where not trained, the HF convention: the
model shifts them) and the same information as `response_mask` (1 where `labels` is a trained
token), aligned with `input_ids`; `position_ids` restart at 0 for every sample. The exception is a
padding-free comparison batch whose sequences share their prompt (`collate_shared_prompts`): one
state predicts the first own token of each sequence of a prompt, so it lists its trained tokens
and their predicting states instead.

Padding-free puts a batch's samples in rows of at most `row_capacity` tokens (or all in one row);
packing fills rows of `capacity` tokens best-fit decreasing across batches. Neither may let a sample
see another: attention must be block-diagonal. transformers 5.x derives that block structure from
restarting `position_ids` only when no attention mask *and no cache* is passed — and a plain
`model(input_ids, position_ids=...)` builds a DynamicCache (config.use_cache defaults to True), so
the blocks silently leak into each other (measured: logits off by ~1.1 on the tiny Llama with SDPA
on CPU). Hence packed batches carry an explicit 4-D block-causal additive mask by default
(`attention="mask"`, works with eager and SDPA); with `attention="position_ids"` they carry none,
for flash/SDPA kernels called with use_cache=False. The first token of every sample is never a
target, so no loss crosses a boundary either.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import torch
from datasets import Dataset
from torch import Tensor

from posttrain.data.columns import column_values, concatenated_rows, row_lengths
from posttrain.data.tokenize import IGNORE_INDEX

Sample = Mapping[str, Any]


def pack_bfd(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the longest samples first, each into the open bin it fills best.

    Returns bins of sample indices (each bin's lengths sum to <= capacity). A sample longer than
    `capacity` is an error: truncate or drop it first (the tokeniser's `max_length` does).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining space, bin index), sorted
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"sample {i} has {size} tokens, more than the packing capacity {capacity}")
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            remaining, b = free.pop(slot)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (remaining - size, b))
    return bins


def pack_dataset(dataset: Dataset, capacity: int) -> Dataset:
    """Rows of concatenated samples (best-fit decreasing), with `seq_lengths` to split them again."""
    bins = pack_bfd(column_values(dataset, "length"), capacity)
    lengths = row_lengths(dataset, "input_ids")
    # Concatenated in Arrow: every token as a Python int cost ~130 bytes (3 GB at peak for 16M tokens).
    return Dataset(pa.table({
        "input_ids": concatenated_rows(dataset, "input_ids", bins),
        "response_mask": concatenated_rows(dataset, "response_mask", bins),
        "seq_lengths": pa.array([[lengths[i] for i in b] for b in bins], type=pa.list_(pa.int64())),
    }))


def unpack_row(row: Sample) -> list[dict[str, list[int]]]:
    """The samples of one packed row."""
    samples, start = [], 0
    for n in row["seq_lengths"]:
        samples.append({"input_ids": row["input_ids"][start:start + n],
                        "response_mask": row["response_mask"][start:start + n]})
        start += n
    return samples


def collate_padded(samples: Sequence[Sample], pad_token_id: int, side: str = "right",
                   ids_key: str = "input_ids", mask_key: str = "response_mask") -> dict[str, Tensor]:
    """One sample per row, padded on `side` to the longest.

    Returns input_ids, attention_mask (1 = real token), position_ids (0 at each sample's first real
    token), labels and response_mask, all [B, T]. Left padding is for generation and for scoring a
    batch exactly as the sampler saw it; per-token logprobs do not depend on the side.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(s[ids_key]) for s in samples)
    shape = (len(samples), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    response_mask = torch.zeros(shape, dtype=torch.long)
    for b, sample in enumerate(samples):
        n = len(sample[ids_key])
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        input_ids[b, cols] = torch.tensor(sample[ids_key], dtype=torch.long)
        attention_mask[b, cols] = 1
        position_ids[b, cols] = torch.arange(n)
        if mask_key in sample:
            response_mask[b, cols] = torch.tensor(sample[mask_key], dtype=torch.long)
    response_mask[position_ids == 0] = 0  # a first token has no context to be predicted from
    labels = input_ids.masked_fill(response_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "labels": labels, "response_mask": response_mask}


def collate_packed(rows: Sequence[Sequence[Sample]], pad_token_id: int, attention: str = "mask",
                   mask_dtype: torch.dtype = torch.float32,
                   indices: Sequence[Sequence[int]] | None = None) -> dict[str, Tensor]:
    """Several samples per row (`rows[r]` = the samples of row r), right-padded to the longest row.

    Returns input_ids, position_ids (restarting at 0 for every sample), labels, response_mask and
    sample_ids (-1 on padding), all [R, T], and with attention="mask" an additive block-causal
    attention_mask [R, 1, T, T] in `mask_dtype` (0 where a query may attend, the dtype's minimum
    elsewhere). A sample's id is `indices[r][k]` for the k-th sample of row r, by default its index in
    the flattened `rows`. Per-sample losses are recovered by grouping target tokens by `sample_ids`.
    """
    if attention not in ("mask", "position_ids"):
        raise ValueError(f"attention must be 'mask' or 'position_ids', got {attention!r}")
    width = max(sum(len(s["input_ids"]) for s in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    response_mask = torch.zeros(shape, dtype=torch.long)
    sample_ids = torch.full(shape, -1, dtype=torch.long)
    segments = torch.zeros(shape, dtype=torch.long)  # block of each token within its row
    index = 0
    for r, row in enumerate(rows):
        start = 0
        for k, sample in enumerate(row):
            n = len(sample["input_ids"])
            cols = slice(start, start + n)
            input_ids[r, cols] = torch.tensor(sample["input_ids"], dtype=torch.long)
            response_mask[r, cols] = torch.tensor(sample["response_mask"], dtype=torch.long)
            position_ids[r, cols] = torch.arange(n)
            sample_ids[r, cols] = index if indices is None else indices[r][k]
            segments[r, cols] = k
            start += n
            index += 1
        # Padding is a block of its own, so it attends only to itself. Its positions stay 0 (zeros above): counting on
        # from 0 they could pass a learned position table (GPT-2's, OPT's) in a row wider than the model's context.
        segments[r, start:] = len(row)
    response_mask[position_ids == 0] = 0  # no target across a sample boundary
    labels = input_ids.masked_fill(response_mask == 0, IGNORE_INDEX)
    batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels,
             "response_mask": response_mask, "sample_ids": sample_ids}
    if attention == "mask":
        batch["attention_mask"] = block_causal_mask(segments, mask_dtype)
    return batch


def block_causal_mask(segments: Tensor, dtype: torch.dtype = torch.float32, parents: Tensor | None = None) -> Tensor:
    """Additive [R, 1, T, T] mask: query t attends to key s iff s <= t and both are in one segment, or
    (with `parents` [R, T], the segment each token's segment continues) s is in t's parent segment: a
    tree of segments, e.g. one prompt whose completions each see it and themselves but not each other."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = segments[:, :, None] == segments[:, None, :]
    if parents is not None:
        allowed |= parents[:, :, None] == segments[:, None, :]
    allowed &= causal
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


@dataclasses.dataclass(frozen=True)
class PackingOptions:
    """How a padding-free comparison batch keeps its sequences apart (as `collate_packed`), the most tokens a row
    holds (`row_capacity`, 0: all sequences in one row), and whether sequences that open with the same prompt take
    it once (`share_prompts`, `collate_shared_prompts`; only with the 4-D mask, which can say so)."""

    attention: str = "mask"
    mask_dtype: torch.dtype = torch.float32
    row_capacity: int = 0
    share_prompts: bool = False


# The row widths `capped_rows` tries, from the longest sample up to the capacity, in steps of this many tokens.
ROW_WIDTH_STEP = 8


def capped_rows(lengths: Sequence[int], capacity: int | None) -> list[list[int]]:
    """Sample indices per row: best-fit decreasing into rows of at most `capacity` tokens (a longer sample
    gets a row of its own), or all in one row when `capacity` is 0 or None.

    The rows are padded to the widest one, so filling them up to `capacity` is not always the least work: of the
    bounds from the longest sample up to `capacity` (every `ROW_WIDTH_STEP` tokens), the packing with the fewest
    padded slots (rows x widest row) is kept, the narrowest of equals (attention runs over a whole row, the mask
    hiding but not skipping the other samples). On the SFT benchmark's rows (16 samples of ~57 tokens, at most
    ~120) bounds of 160 instead of 256 made the steps ~9% faster in fp32 and bf16 and the peak RSS ~5% lower.
    """
    if not capacity:
        return [list(range(len(lengths)))]
    if not lengths:
        return []
    longest = max(lengths)
    widest = max(capacity, longest)
    best: tuple[int, list[list[int]]] | None = None
    for bound in [*range(longest, widest, ROW_WIDTH_STEP), widest]:
        rows = pack_bfd(lengths, bound)
        slots = padded_slots(lengths, rows)
        if best is None or slots < best[0]:
            best = (slots, rows)
    return best[1]


def padded_slots(lengths: Sequence[int], rows: Sequence[Sequence[int]]) -> int:
    """Token positions a packed forward computes: its rows (of sample indices) times the widest row's tokens."""
    return len(rows) * max(sum(lengths[i] for i in row) for row in rows)


def collate_sequences(flat: Sequence[Sample], pad_token_id: int,
                      packing: PackingOptions | None) -> dict[str, Tensor]:
    """Padded rows, or (padding-free) the sequences packed into capped rows: sequence i is `sample_ids == i`
    whichever row it lands in, or with `packing.share_prompts` (and a mask) each prompt once for the sequences that
    open with it (`collate_shared_prompts`: sequence i is `target_sequences == i` and ends at `sequence_ends[i]`)."""
    if packing is None:
        return collate_padded(flat, pad_token_id)
    if packing.share_prompts and packing.attention == "mask":
        return collate_shared_prompts(flat, pad_token_id, packing.row_capacity, packing.mask_dtype)
    rows = capped_rows([len(s["input_ids"]) for s in flat], packing.row_capacity)
    return collate_packed([[flat[i] for i in row] for row in rows], pad_token_id, packing.attention,
                          packing.mask_dtype, indices=rows)


def indices_by_key(keys: Sequence[Hashable]) -> list[list[int]]:
    """The indices of equal keys together, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def prompt_groups(flat: Sequence[Sample]) -> list[list[int]]:
    """Indices of the sequences that open with the same prompt (equal tokens before their first trained one), in
    order of first appearance: a pair's chosen and rejected answer, a ranking's responses, KTO's row and its
    mismatched pair, the sampled completions of one prompt."""
    keys = []
    for sample in flat:
        mask = sample["response_mask"]
        first = next((j for j, trained in enumerate(mask) if trained), len(mask))
        keys.append(tuple(sample["input_ids"][:first]))
    return indices_by_key(keys)


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """The tokens two or more sequences share at their start and lay out once: their longest common prefix, less
    what would leave one of them without a token of its own (its last token is where a reward is read)."""
    shortest = min(len(s) for s in sequences)
    first = sequences[0]
    for j in range(shortest - 1):
        if any(s[j] != first[j] for s in sequences[1:]):
            return j
    return shortest - 1


def cut_group(members: Sequence[int], prompt_length: int, own_lengths: Sequence[int],
              capacity: int | None) -> list[list[int]]:
    """The members of one prompt's group in consecutive pieces of at most `capacity` tokens each, counting one copy
    of the prompt per piece and each member's `own_lengths` after it (a piece holds one member at least; 0 or None:
    one piece). A whole group of long answers would be one row as wide as all of them: a dense mask of its width
    squared, and attention over it where the model does not take the tree."""
    pieces: list[list[int]] = []
    piece, size = [], prompt_length
    for i, own in zip(members, own_lengths, strict=True):
        if piece and capacity and size + own > capacity:
            pieces.append(piece)
            piece, size = [], prompt_length
        piece.append(i)
        size += own
    return [*pieces, piece] if piece else pieces


def collate_shared_prompts(flat: Sequence[Sample], pad_token_id: int, row_capacity: int = 0,
                           mask_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Padding-free sequences where those that open with the same prompt (`prompt_groups`) lay their common
    prefix (`shared_prefix_length`) out once, each followed by the rest of every one of them: a pair's chosen and
    rejected answer attend to one copy of their prompt. Exact (a causal model's states of a prefix do not depend
    on what follows it, and the prefix's gradient is the sum of what its sequences send it, as over copies); the
    forward computes the prompt once instead of once per sequence (most of the tokens of preference data whose
    answers are short). A group longer than `row_capacity` is cut into pieces that fit it, each with its copy of the
    prefix (`cut_group`); units (a piece, or a sequence alone) go best-fit into rows of at most `row_capacity` tokens
    (`capped_rows`). With dropout on, the sequences of a prompt share its one dropout draw there (no longer
    independent draws per sequence; posttrain turns dropout off by default, `model.disable_dropout`).

    Returns input_ids and position_ids [R, W] (a sequence's positions count on through its shared prefix),
    segment_ids and parent_ids [R, W] (-1 on padding; a prefix and a lone sequence are their own parent, the rest
    of a grouped sequence has its prefix's segment as parent), the additive [R, 1, W, W] `block_causal_mask` of that
    tree in `mask_dtype`, and, in place of the [R, W] response mask (no longer one target per position: the
    prefix's last token predicts every member's first own token), the trained tokens as flat gathers: `targets` [N]
    (their ids), `predictors` [N] (the flat index row * W + column of the state that predicts each), and
    `target_sequences` [N] (the sequence each belongs to, its index in `flat`); `sequence_ends` [S] is the flat index
    of every sequence's last token, in `flat`'s order.
    """
    lengths = [len(sample["input_ids"]) for sample in flat]
    units = []  # (shared prefix length, or None for a sequence laid out alone; member indices)
    for group in prompt_groups(flat):
        members = [i for i in group if lengths[i] > 1]  # a single token has nothing to share a prefix with
        shared = shared_prefix_length([flat[i]["input_ids"] for i in members]) if len(members) > 1 else 0
        pieces = cut_group(members, shared, [lengths[i] - shared for i in members], row_capacity) if shared else []
        units += [(shared, piece) for piece in pieces]
        units += [(None, [i]) for i in group if not shared or lengths[i] == 1]
    sizes = [sum(lengths[i] for i in members) - (len(members) - 1) * (shared or 0) for shared, members in units]
    rows = capped_rows(sizes, row_capacity)
    width = max(sum(sizes[u] for u in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    parent_ids = torch.full(shape, -1, dtype=torch.long)
    predictors, targets, target_sequences = [], [], []
    ends = [0] * len(flat)
    cursor = {"column": 0, "segment": 0}  # in the row being laid out

    def lay(r: int, tokens: Sequence[int], first_position: int, parent: int) -> int:
        """Writes `tokens` at row r's next columns as a new segment (its own parent for -1); returns their first
        column."""
        start, segment = cursor["column"], cursor["segment"]
        cols = slice(start, start + len(tokens))
        input_ids[r, cols] = torch.tensor(tokens, dtype=torch.long)
        position_ids[r, cols] = torch.arange(first_position, first_position + len(tokens))
        segment_ids[r, cols], parent_ids[r, cols] = segment, segment if parent < 0 else parent
        cursor.update(column=start + len(tokens), segment=segment + 1)
        return start

    for r, row in enumerate(rows):
        cursor.update(column=0, segment=0)
        for u in row:
            shared, members = units[u]
            prefix_segment, prefix_start, own = -1, 0, shared or 0  # own: where a member's own tokens begin
            if shared:
                prefix_segment = cursor["segment"]
                prefix_start = lay(r, flat[members[0]]["input_ids"][:shared], 0, -1)
            for i in members:
                ids, mask = flat[i]["input_ids"], torch.tensor(flat[i]["response_mask"], dtype=torch.bool)
                mask[0] = False  # a first token has no context to be predicted from
                start = lay(r, ids[own:], own, prefix_segment)
                trained = mask.nonzero().flatten()  # token j is predicted by token j - 1, in the prefix or its own
                before = trained - 1
                columns = torch.where(before < own, prefix_start + before, start + before - own)
                predictors.append(r * width + columns)
                targets.append(torch.tensor(ids, dtype=torch.long)[trained])
                target_sequences.append(torch.full((len(trained),), i, dtype=torch.long))
                ends[i] = r * width + start + len(ids) - own - 1
    empty = torch.zeros(0, dtype=torch.long)
    return {"input_ids": input_ids, "position_ids": position_ids, "segment_ids": segment_ids,
            "parent_ids": parent_ids, "attention_mask": block_causal_mask(segment_ids, mask_dtype, parent_ids),
            "predictors": torch.cat(predictors) if predictors else empty,
            "targets": torch.cat(targets) if targets else empty,
            "target_sequences": torch.cat(target_sequences) if target_sequences else empty,
            "sequence_ends": torch.tensor(ends, dtype=torch.long)}


def collate_pairs(samples: Sequence[Sample], pad_token_id: int,
                  packing: PackingOptions | None = None) -> dict[str, Tensor]:
    """Preference pairs as 2B sequences, the B chosen first, then the B rejected: one right-padded row
    each, or with `packing` packed into rows without padding (`collate_sequences`: sequence i of the 2B).

    Adds `margin` [B] (0 where a row has none) and `preference_probs` [B] (1 where a row has none).
    """
    chosen = [{"input_ids": s["chosen_input_ids"], "response_mask": s["chosen_response_mask"]} for s in samples]
    rejected = [{"input_ids": s["rejected_input_ids"], "response_mask": s["rejected_response_mask"]}
                for s in samples]
    batch = collate_sequences([*chosen, *rejected], pad_token_id, packing)
    batch["margin"] = torch.tensor([s.get("margin") or 0.0 for s in samples], dtype=torch.float32)
    probabilities = [s.get("preference_prob") for s in samples]
    batch["preference_probs"] = torch.tensor([1.0 if p is None else p for p in probabilities], dtype=torch.float32)
    return batch


def collate_rankings(samples: Sequence[Sample], pad_token_id: int,
                     packing: PackingOptions | None = None) -> dict[str, Tensor]:
    """Every response of every ranking, best first within each ranking: one right-padded row each, or
    with `packing` packed into rows without padding (`collate_sequences`: response i of the N).

    Adds ranking_ids [N] (which ranking a row belongs to), ranks [N] (its position, 0 = best), levels [N]
    (0 = best; tied responses share a level: equal scores) and scores [N] (the given scores, or minus the
    rank when a row has none). `ranking_matrix` turns per-row values back into [B, K] for a Plackett-Luce loss.
    """
    flat, ranking_ids, ranks, levels, scores = [], [], [], [], []
    for b, sample in enumerate(samples):
        given = sample.get("scores")
        row_scores = given if given else [-float(k) for k in range(len(sample["ranked_input_ids"]))]
        for k, (ids, mask) in enumerate(zip(sample["ranked_input_ids"], sample["ranked_response_mask"],
                                            strict=True)):
            flat.append({"input_ids": ids, "response_mask": mask})
            ranking_ids.append(b)
            ranks.append(k)
            # Best first, so a new level starts wherever the score drops.
            levels.append(0 if k == 0 else levels[-1] + (row_scores[k] != row_scores[k - 1]))
            scores.append(row_scores[k])
    batch = collate_sequences(flat, pad_token_id, packing)
    batch["ranking_ids"] = torch.tensor(ranking_ids, dtype=torch.long)
    batch["ranks"] = torch.tensor(ranks, dtype=torch.long)
    batch["levels"] = torch.tensor(levels, dtype=torch.long)
    batch["scores"] = torch.tensor(scores, dtype=torch.float32)
    return batch


def collate_unpaired(samples: Sequence[Sample], pad_token_id: int,
                     packing: PackingOptions | None = None) -> dict[str, Tensor]:
    """Unpaired rows as 2B sequences, the B rows first, then their B mismatched pairs (`kl_pairs`): one
    right-padded row each, or with `packing` packed into rows without padding (`collate_sequences`: sequence i of
    the 2B).
    The layout of `collate_pairs`, so that a row and its pair travel as a pair does.

    Adds desirable [B] (bool: the row's label).
    """
    rows = [{"input_ids": s["input_ids"], "response_mask": s["response_mask"]} for s in samples]
    pairs = [{"input_ids": s["kl_input_ids"], "response_mask": s["kl_response_mask"]} for s in samples]
    batch = collate_sequences([*rows, *pairs], pad_token_id, packing)
    batch["desirable"] = torch.tensor([bool(s["label"]) for s in samples], dtype=torch.bool)
    return batch


def ranking_matrix(values: Tensor, ranking_ids: Tensor, ranks: Tensor) -> tuple[Tensor, Tensor]:
    """Per-response values [N] -> ([B, K] best first, mask [B, K]) for rankings of different sizes."""
    rows, width = int(ranking_ids.max()) + 1, int(ranks.max()) + 1
    matrix = values.new_zeros(rows, width)
    mask = torch.zeros(rows, width, dtype=torch.bool, device=values.device)
    matrix[ranking_ids, ranks] = values
    mask[ranking_ids, ranks] = True
    return matrix, mask


def collate_stepwise(samples: Sequence[Sample], pad_token_id: int) -> dict[str, Tensor]:
    """Right-padded stepwise rows plus step_ends [B, S] (token index of each step's separator, where
    a process reward model reads its score), step_labels [B, S] and step_mask [B, S]."""
    batch = collate_padded(samples, pad_token_id)
    steps = max(len(s["step_ends"]) for s in samples)
    step_ends = torch.zeros(len(samples), steps, dtype=torch.long)
    step_labels = torch.zeros(len(samples), steps, dtype=torch.float32)
    step_mask = torch.zeros(len(samples), steps, dtype=torch.long)
    for b, sample in enumerate(samples):
        n = len(sample["step_ends"])
        step_ends[b, :n] = torch.tensor(sample["step_ends"], dtype=torch.long)
        step_labels[b, :n] = torch.tensor(sample["step_labels"], dtype=torch.float32)
        step_mask[b, :n] = 1
    return batch | {"step_ends": step_ends, "step_labels": step_labels, "step_mask": step_mask}


def collate_prompts(samples: Sequence[Sample], pad_token_id: int) -> dict[str, Any]:
    """Left-padded prompts for generation: input_ids, attention_mask, position_ids [B, T], plus the
    rows' `answer`, `steps` and `prompt` (messages) as lists for the verifier and the logs."""
    batch: dict[str, Any] = collate_padded(samples, pad_token_id, side="left", ids_key="prompt_input_ids")
    for key in ("labels", "response_mask"):
        batch.pop(key)
    for key in ("answer", "steps", "prompt"):
        if key in samples[0]:
            batch[key] = [s[key] for s in samples]
    return batch


# Formats whose rows are several sequences, collated padded or padding-free.
_SEQUENCE_COLLATORS = {"preference": collate_pairs, "ranking": collate_rankings, "unpaired": collate_unpaired}


@dataclasses.dataclass(frozen=True)
class Collator:
    """The collate function for a format and a batch mode (usable as a DataLoader's `collate_fn`).

    In packed mode the dataset rows are packed rows (`pack_dataset`); in padding-free mode they are
    samples, and each batch (SFT samples, or the sequences of pairs and rankings) is packed best-fit
    decreasing into rows of at most `row_capacity` tokens (0: one row). Why cap: the block-causal mask
    hides other samples but attention still runs over the whole row (where the model does not take the
    prefix tree), so one row of a 64-sample batch (~3,600 tokens) costs more than the model's layers, and
    the dense mask grows with the row's width squared. Comparison sequences that open with one prompt take it
    once (`share_prompts`, `collate_shared_prompts`; a group longer than a row is cut into pieces, each
    with its copy of the prompt), as `data.share_prompts` says by default.
    """

    format: str
    pad_token_id: int
    batch_mode: str = "padded"
    packed_attention: str = "mask"
    mask_dtype: torch.dtype = torch.float32
    row_capacity: int = 0
    share_prompts: bool = True

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        if self.format in ("completion", "messages", "text"):
            if self.batch_mode == "padding_free":
                return collate_packed(self._padding_free_rows(samples), self.pad_token_id, self.packed_attention,
                                      self.mask_dtype)
            if self.batch_mode == "packed":
                return collate_packed([unpack_row(s) for s in samples], self.pad_token_id,
                                      self.packed_attention, self.mask_dtype)
            return collate_padded(samples, self.pad_token_id)
        if self.format in _SEQUENCE_COLLATORS and self.batch_mode != "packed":
            packing = (PackingOptions(self.packed_attention, self.mask_dtype, self.row_capacity, self.share_prompts)
                       if self.batch_mode == "padding_free" else None)
            return _SEQUENCE_COLLATORS[self.format](samples, self.pad_token_id, packing)
        if self.batch_mode != "padded":
            raise ValueError(f"batch_mode {self.batch_mode!r} is for SFT formats (padding_free also for preference, "
                             f"ranking and unpaired rows); {self.format!r} rows are padded")
        return {"stepwise": collate_stepwise, "verifiable": collate_prompts}[self.format](samples, self.pad_token_id)

    def _padding_free_rows(self, samples: Sequence[Sample]) -> list[list[Sample]]:
        rows = capped_rows([len(s["input_ids"]) for s in samples], self.row_capacity)
        return [[samples[i] for i in row] for row in rows]
