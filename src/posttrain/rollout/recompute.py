"""The trainer's side of the logprob bookkeeping: recompute the policy's logprobs of a Rollout.

The sampler's logprobs come from a KV-cached, token-by-token forward; the trainer's from one padded
forward over prompt + completion. On CPU fp32 they agree to rounding (mean |diff| ~1e-7); a larger
mismatch means the positions, the masks or the temperature differ between the two, and it biases
every importance ratio, so recipes report it.

The padded forward runs on the rollout's [B, P + T] layout: left-padded prompts of very different
lengths and right-padded completions, so a third or more of its tokens can be padding.
`packed_logprobs_and_entropy` computes the same numbers padding-free: the real tokens of the rows
packed into a few rows (positions restarting per sample, a block-diagonal causal mask), the
vocabulary projection only at the positions that predict a completion token, and the result
scattered back to [B, T].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

from posttrain.algos import entropy_from_logits, masked_mean, token_logprobs
from posttrain.data.collate import block_causal_mask, capped_rows, cut_group, indices_by_key, padded_slots
from posttrain.models.attention import layer_attention_mask
from posttrain.models.cpu_attention import tree_keywords
from posttrain.models.device import model_device, move_to
from posttrain.models.heads import floating_dtype, forward_keeping, output_head_at
from posttrain.models.prefix_attention import PrefixTree, unmaterialised_mask
from posttrain.rollout.base import Rollout


def policy_logprobs(model: torch.nn.Module, rollout: Rollout, temperature: float | None = None) -> Tensor:
    """Per-token logprobs [B, T] of the rollout's completions under `model`, 0 outside the response mask.

    One forward over [prompt | completion] with the rollout's attention mask and positions (counted
    from each row's first real token, as while sampling); only the T + 1 last positions' logits are
    computed. `temperature` defaults to the rollout's. Gradients flow unless the caller disables them.
    The forward runs on the model's device; the values come back on the rollout's.
    """
    return policy_logprobs_and_entropy(model, rollout, temperature, entropy=False)[0]


def policy_logprobs_and_entropy(model: torch.nn.Module, rollout: Rollout, temperature: float | None = None,
                                entropy: bool = True) -> tuple[Tensor, Tensor | None]:
    """`policy_logprobs` and, from the same logits, the policy's entropy [B, T] at every completion
    position (0 outside the response mask; no gradient: it is a statistic to log, not a loss term)."""
    home, rollout = rollout.completion_ids.device, move_to(rollout, model_device(model))
    width = rollout.completion_ids.shape[1]
    logits = forward_keeping(model, width + 1, input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                             position_ids=rollout.position_ids).logits
    return move_to(completion_logprobs(logits, rollout, temperature, entropy), home)


@dataclasses.dataclass(frozen=True)
class PackedRollout:
    """A rollout's real tokens (each row's real prompt tokens, then its completion tokens inside the
    response mask) packed into R rows of width W, and where each completion token's logit comes from.

    input_ids, position_ids [R, W]: positions count from each sample's first real token, as the
    rollout's. attention_mask [R, 1, W, W]: additive and block-causal (a sample sees only its own past;
    padding at a row's end is a block of its own). With shared prompts, the samples of one prompt
    follow one copy of it and each sees that copy and its own past. The hidden state at
    (source_rows[k], source_cols[k]) predicts completion token (target_rows[k], target_cols[k]) of the
    rollout's [B, T]; all four [N].
    """

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    source_rows: Tensor
    source_cols: Tensor
    target_rows: Tensor
    target_cols: Tensor
    completion_shape: tuple[int, int]
    """[B, T] of the rollout's completions."""
    tree: Callable[[], PrefixTree]
    """The same layout as prompt copies and completions, built when first asked for: attention computes only what
    the mask lets through (`models.prefix_attention`) where the model's attention takes it
    (`cpu_attention.tree_keywords`); elsewhere (GPUs, other attention) it is never built."""

    @property
    def sources(self) -> tuple[Tensor, Tensor]:
        """(rows, cols) of the hidden states that predict the completion tokens, in `scatter`'s order."""
        return self.source_rows, self.source_cols

    def scatter(self, values: Tensor) -> Tensor:
        """Per-completion-token values [N] (or [1, N]) -> [B, T], 0 outside the response mask."""
        values = values.reshape(-1)
        return values.new_zeros(self.completion_shape).index_put((self.target_rows, self.target_cols), values)


@dataclasses.dataclass(frozen=True)
class PaddingFree:
    """How a padding-free forward lays a rollout out (`pack_rollout`): rows of about `capacity` tokens
    (None: one row), and one copy of each prompt per group of its samples (`share_prompts`), the group cut
    into pieces of at most `capacity` tokens (each with its copy of the prompt) unless `whole_groups`: where the
    model's attention takes the batch's `PrefixTree`, a wide row costs it nothing and a cut only repeats the prompt,
    so whole groups go side by side in one row (no padding) with no dense mask (`unmaterialised_mask`)."""

    capacity: int | None = None
    share_prompts: bool = False
    whole_groups: bool = False

    @property
    def unit_capacity(self) -> int | None:
        """The most tokens of a group `packing_units` lays out after one copy of its prompt, and of a row (None:
        all)."""
        return None if self.whole_groups else self.capacity


def prompt_keys(rollout: Rollout) -> list[tuple[int, ...]]:
    """Each row's real prompt tokens: rows with equal keys sample the same prompt."""
    real = rollout.prompt_mask.bool()
    return [tuple(ids[keep].tolist()) for ids, keep in zip(rollout.prompt_ids, real, strict=True)]


def packing_units(keys: Sequence[Hashable], prompt_lengths: Sequence[int], completion_lengths: Sequence[int],
                  share_prompts: bool, capacity: int | None) -> list[list[int]]:
    """The samples the padding-free layout lays out together: each alone after its own prompt, or (with
    `share_prompts`) the samples of one prompt (equal `keys`, in order of first appearance) after one copy
    of it, cut into consecutive units of at most `capacity` tokens where a sample fits (one sample at least).

    Sharing is exact: a completion attends to the same prompt keys and values either way, and the gradient
    of the shared prompt is the sum of its samples' gradients, as it is over separate copies. It removes
    (G - 1) x prompt tokens per group of G from every forward, backward and no-grad pass."""
    if not share_prompts:
        return [[i] for i in range(len(keys))]
    return [piece for members in indices_by_key(keys)
            for piece in cut_group(members, prompt_lengths[members[0]], [completion_lengths[i] for i in members],
                                   capacity)]


def packed_width_cost(keys: Sequence[Hashable], prompt_lengths: Sequence[int], completion_lengths: Sequence[int],
                      layout: PaddingFree) -> int:
    """Token positions (packed rows x their width) the padding-free forward of these samples computes."""
    units = packing_units(keys, prompt_lengths, completion_lengths, layout.share_prompts, layout.unit_capacity)
    sizes = [prompt_lengths[u[0]] + sum(completion_lengths[i] for i in u) for u in units]
    return padded_slots(sizes, capped_rows(sizes, layout.unit_capacity))


def pack_rollout(rollout: Rollout, capacity: int | None = None, mask_dtype: torch.dtype = torch.float32,
                 pad_token_id: int = 0, share_prompts: bool = False, whole_groups: bool = False) -> PackedRollout:
    """The padding-free layout of `rollout`: every sample in one row (capacity None), or samples packed
    best-fit decreasing into rows of at most max(capacity, longest sample) tokens; with `share_prompts`,
    one copy of a prompt per group of its samples (`packing_units`; `whole_groups` as `PaddingFree`'s). On the
    rollout's device.

    A single row costs attention over all its tokens squared (the mask hides other samples, the kernel
    still computes them), so large batches are better cut into rows of a few hundred tokens.
    """
    device = rollout.completion_ids.device
    rollout = move_to(rollout, "cpu")  # packed sample by sample: on a GPU that would be a sync per sample
    prompt_lengths = rollout.prompt_mask.sum(dim=1).tolist()
    completion_lengths = rollout.response_mask.sum(dim=1).tolist()
    if min(prompt_lengths, default=1) == 0:
        raise ValueError("every rollout row needs a real prompt token: it predicts the first completion token")
    keys = prompt_keys(rollout) if share_prompts else list(range(len(prompt_lengths)))
    cut = PaddingFree(capacity, share_prompts, whole_groups).unit_capacity  # whole groups: one row, no padding
    units = packing_units(keys, prompt_lengths, completion_lengths, share_prompts, cut)
    sizes = [prompt_lengths[u[0]] + sum(completion_lengths[i] for i in u) for u in units]
    rows = capped_rows(sizes, cut)
    width = max(sum(sizes[u] for u in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segments = torch.zeros(shape, dtype=torch.long)
    parents = torch.zeros(shape, dtype=torch.long)
    real = rollout.attention_mask.bool()
    all_ids, all_positions = rollout.input_ids, rollout.position_ids
    sources: list[tuple[Tensor, Tensor]] = []
    targets: list[tuple[int, int]] = []
    tree_rows: list[list[tuple[int, int, list[tuple[int, int]]]]] = []
    for r, row in enumerate(rows):
        start, segment = 0, 0
        tree_rows.append([])
        for u in row:
            first = units[u][0]
            prompt = prompt_lengths[first]
            tree_rows[-1].append((start, prompt, []))
            ids, positions = all_ids[first][real[first]], all_positions[first][real[first]]
            input_ids[r, start:start + prompt] = ids[:prompt]
            position_ids[r, start:start + prompt] = positions[:prompt]
            segments[r, start:start + prompt] = parents[r, start:start + prompt] = prompt_segment = segment
            last_prompt_col, start = start + prompt - 1, start + prompt
            for i in units[u]:
                n = completion_lengths[i]
                segment += 1  # a segment per completion: it sees its prompt (the parent) and its own past
                ids, positions = all_ids[i][real[i]], all_positions[i][real[i]]
                input_ids[r, start:start + n] = ids[prompt:]
                position_ids[r, start:start + n] = positions[prompt:]
                segments[r, start:start + n], parents[r, start:start + n] = segment, prompt_segment
                # Completion token j is predicted by the token before it: the prompt's last for j = 0.
                cols = torch.cat([torch.tensor([last_prompt_col]), torch.arange(start, start + n - 1)])[:n]
                sources.append((torch.full((n,), r), cols))
                targets.append((i, n))
                tree_rows[-1][-1][2].append((start, n))
                start += n
            segment += 1
        # Padding stays at position 0 (zeros above): a position past the last real token's could pass a learned
        # position table (GPT-2's, OPT's) when a row is wider than the model's context.
        segments[r, start:] = parents[r, start:] = segment
    return PackedRollout(
        input_ids=input_ids.to(device), position_ids=position_ids.to(device),
        # whole groups go only to models whose every layer computes from the tree: no dense mask of R x W^2
        attention_mask=(unmaterialised_mask(len(rows), width, mask_dtype) if whole_groups
                        else block_causal_mask(segments, mask_dtype, parents)).to(device),
        source_rows=torch.cat([rows_ for rows_, _ in sources]).to(device),
        source_cols=torch.cat([cols for _, cols in sources]).to(device),
        target_rows=torch.cat([torch.full((n,), i) for i, n in targets]).to(device),
        target_cols=torch.cat([torch.arange(n) for _, n in targets]).to(device),
        completion_shape=tuple(rollout.completion_ids.shape),
        tree=functools.cache(lambda: move_to(PrefixTree.of_rows(width, tree_rows, mask_dtype), device)))


def packed_logprobs_and_entropy(model: torch.nn.Module, rollout: Rollout, temperature: float | None = None,
                                entropy: bool = True, capacity: int | None = None,
                                share_prompts: bool = False, whole_groups: bool = False
                                ) -> tuple[Tensor, Tensor | None]:
    """`policy_logprobs_and_entropy` without padding: the same [B, T] logprobs (and entropy, a statistic
    without gradient) from a forward over the rollout's real tokens only (`pack_rollout`; `capacity` and
    `share_prompts`, `whole_groups` as there), with the output projection applied only to the hidden states that predict
    completion tokens.
    """
    home, rollout = rollout.completion_ids.device, move_to(rollout, model_device(model))
    packed = pack_rollout(rollout, capacity, mask_dtype=floating_dtype(model), share_prompts=share_prompts,
                          whole_groups=whole_groups)
    with output_head_at(model, *packed.sources):
        mask = layer_attention_mask(model, packed.attention_mask, packed.position_ids)  # the model's sliding window
        logits = model(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                       use_cache=False, **tree_keywords(model, packed.tree)).logits  # [1, N, V]
    return move_to(packed_completion_logprobs(logits, rollout, packed, temperature, entropy), home)


def packed_completion_logprobs(logits: Tensor, rollout: Rollout, packed: PackedRollout,
                               temperature: float | None = None, entropy: bool = True,
                               entropy_grad: bool = False) -> tuple[Tensor, Tensor | None]:
    """`completion_logprobs` of the padding-free layout: from the logits [1, N, V] at `packed.sources`,
    the logprobs and entropy [B, T] of the rollout's completion tokens (0 outside the response mask)."""
    temperature = rollout.temperature if temperature is None else temperature
    labels = rollout.completion_ids[packed.target_rows, packed.target_cols][None]
    logprobs = packed.scatter(token_logprobs(logits, labels, temperature))
    if not entropy:
        return logprobs, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        values = entropy_from_logits(logits if entropy_grad else logits.detach(), temperature)
    return logprobs, packed.scatter(values)


PolicyForward = Callable[..., tuple[Tensor, Tensor | None]]
"""(model, rollout, temperature=None, entropy=True) -> (logprobs, entropy) [B, T]."""


def policy_forward(padding_free: PaddingFree | None) -> PolicyForward:
    """The (model, rollout) -> (logprobs, entropy) [B, T] a recipe trains with: padding-free in the layout
    `padding_free` describes (packed rows of about its capacity, optionally one copy of each prompt per
    group) or, for None, on the rollout's padded layout. All give the same numbers; prefix-tuning adapters
    need the padded one (their virtual tokens do not fit a block-diagonal mask)."""
    if padding_free is not None:
        return functools.partial(packed_logprobs_and_entropy, capacity=padding_free.capacity,
                                 share_prompts=padding_free.share_prompts, whole_groups=padding_free.whole_groups)
    return policy_logprobs_and_entropy


def completion_logprobs(logits: Tensor, rollout: Rollout, temperature: float | None = None, entropy: bool = True,
                        entropy_grad: bool = False) -> tuple[Tensor, Tensor | None]:
    """Logprobs [B, T] of the rollout's completion tokens and the entropy [B, T] at each completion position
    (both 0 outside the response mask), from the logits of the last T + 1 positions [B, T + 1, V]. The
    entropy has a gradient only with `entropy_grad` (an entropy bonus); otherwise it is a statistic."""
    logits = logits[:, :-1]
    temperature = rollout.temperature if temperature is None else temperature
    labels = rollout.completion_ids.masked_fill(rollout.response_mask == 0, -100)
    logprobs = token_logprobs(logits, labels, temperature)
    if not entropy:
        return logprobs, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        values = entropy_from_logits(logits if entropy_grad else logits.detach(), temperature)
    return logprobs, values * rollout.response_mask


def logprob_mismatch(sampler_logprobs: Tensor, trainer_logprobs: Tensor, response_mask: Tensor) -> Tensor:
    """mean over response tokens of |sampler - trainer| logprobs (a scalar; 0 for an empty mask).

    Shapes: all [B, T]. ~0 when sampler and trainer compute the same distribution; it grows with
    precision or kernel differences (bf16, vLLM) and when the policy moved since sampling.
    """
    return masked_mean((sampler_logprobs - trainer_logprobs.detach()).abs(), response_mask)
