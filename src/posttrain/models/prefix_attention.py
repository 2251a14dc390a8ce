"""Attention over a padding-free RL batch that computes only what its block mask lets through.

A padding-free rollout forward (`rollout.recompute.pack_rollout`) lays prompts and completions side by side in
rows of W tokens, each prompt once per group of its completions (`share_prompts`), and hands the model a dense
[R, 1, W, W] block mask. torch's CPU attention kernel applies a mask but still computes every (query, key) pair
it hides, so a row costs W^2 whatever it holds: a prompt of P tokens shared by G completions of C tokens costs
(P + G*C)^2 where only P^2 / 2 + G*C*(P + C) pairs are ever attended to.

`PrefixTree` is where each prompt copy and each completion lies in the flat [R * W] token axis, and
`prefix_tree_attention` computes the same attention as the dense mask from it, in calls of the model's own
attention function: a prompt with a single completion right after it as one causal sequence, every other prompt
copy causally over itself ([U, Pmax] rows, no mask: the kernel's causal path), and every completion of those
over its prompt then its own past ([S, Cmax] queries against
[S, Pmax + Cmax] keys gathered from the flat axis; an additive mask hides the padding), each kind in buckets of
similar lengths (a bucket's shortest more than half its longest), so that the few completions that run to
max_new_tokens do not pad every short one to their length. The outputs go back to the packed rows; padding
slots of the rows get zeros (nothing reads them: no real token attends to a padding slot and no loss sits on
one). Gradients are exact: the gather's backward sums what every completion sent to
its shared prompt's keys and values, as the dense mask's does.

Measured on an AMD EPYC Zen 5, 2 threads, fp32, one layer's forward + backward, 8 prompts x 8 completions:
prompt 46 / completions 31 tokens 35 -> 22 ms; 200 / 128 560 -> 215 ms; 500 / 300 3050 -> 1080 ms. The dense
mask's cost also grows with the rows' width, so without this a group longer than `padding_free_capacity` is
cut into pieces, each with its own copy of the prompt; with it, the width costs attention nothing.

Packed and padding-free batches of whole samples (SFT, DPO, reward models: `data.collate.collate_packed`) get a
tree too (`PrefixTree.of_samples`, through `cpu_attention.sample_tree_keywords`): each sample is a prompt without
completions, causally over itself, so a row of samples costs the sum of their squared lengths in attention instead
of its width squared. Padding-free comparisons whose sequences share their prompt (`collate_shared_prompts`: a pair's
chosen and rejected answer, a reward model scorer's completions of one prompt) get the RL layout's tree
(`PrefixTree.of_segments`): the prompt once, each answer over it. Both only in rows wider than
`cpu_attention.SAMPLE_TREE_MIN_WIDTH` (320 tokens): in narrower ones the dense mask's one call per layer was faster
(with `data.padding_free_capacity`'s default of 256, packed rows and batches widened by one long sample take it).

The dense mask stays the fallback and the reference: models whose layers run another attention (a sliding
window, soft-capping, position biases, a non-SDPA implementation), devices other than the CPU (not measured
there) and forwards that receive no tree use it, with the same numbers up to rounding (tested in float64).
A forward that keeps groups whole (`rollout.recompute.PaddingFree.whole_groups`, only for models whose every layer
takes the tree) gets no dense mask at all (`unmaterialised_mask`): its rows are as wide as a prompt and all its
completions, and a dense mask of them would cost R * W^2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

# The keyword the tree travels under, from the model's forward down to its attention function (transformers
# passes a forward's extra keywords through its layers to the attention interface).
KEYWORD = "prefix_tree"


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """One call of the attention function over gathered tokens: queries at the flat indices `queries` [n, L], each
    row causally over itself (`keys` None), or against the keys and values at `keys` [n, K] under the additive
    `mask` [n, 1, L, K] (in the forward's floating dtype: SDPA would turn a boolean mask into a float copy in every
    layer and keep each for the backward). Padding entries point at a real token, so gathers stay in range."""

    queries: Tensor
    keys: Tensor | None = None
    mask: Tensor | None = None


@dataclasses.dataclass(frozen=True)
class PrefixTree:
    """Where the prompts and completions of a packed [R, W] forward lie, as the attention calls that compute it: a
    prompt followed by its only completion causally over itself, the other prompt copies causally over themselves,
    then each of their completions over its prompt copy and its own past, each
    kind in buckets of similar lengths (`length_buckets`), so that a few long completions do not pad every short one
    to their length. `sources` [N] are the real tokens' positions in the calls' outputs laid end to end, `targets`
    [N] the flat index of the packed rows each goes back to."""

    rows: int
    width: int
    calls: tuple[AttentionCall, ...]
    sources: Tensor
    targets: Tensor

    @staticmethod
    def of_rows(width: int, rows: Sequence[Sequence[tuple[int, int, Sequence[tuple[int, int]]]]],
                mask_dtype: torch.dtype = torch.float32) -> PrefixTree:
        """The tree of packed rows of `width` tokens, given per row its units as (prompt start column, prompt
        length, [(completion start column, completion length), ...]); masks in `mask_dtype` (the model's)."""
        units = [(r * width + start, length, [(r * width + s, n) for s, n in completions])
                 for r, row in enumerate(rows) for start, length, completions in row]
        completions = [(u, first, n) for u, (_, _, members) in enumerate(units) for first, n in members]
        calls, sources, targets, done = [], [], [], 0

        def add(call: AttentionCall, real: Tensor) -> None:
            nonlocal done
            calls.append(call)
            sources.append(done + torch.nonzero(real.flatten()).flatten())
            targets.append(call.queries[real])
            done += call.queries.numel()

        # A prompt with a single completion right after it is one causal sequence: one call over both, no copy
        # of the prompt's keys (PPO's layout: one sample per prompt).
        alone = {u for u, (start, length, members) in enumerate(units)
                 if len(members) == 1 and members[0][0] == start + length}
        sequences = [(units[u][0], units[u][1] + units[u][2][0][1]) for u in sorted(alone)]
        for bucket in length_buckets([length for _, length in sequences]):
            index, real = _spans([sequences[i] for i in bucket], [sequences[i][0] for i in bucket])
            add(AttentionCall(index), real)
        shared = [u for u in range(len(units)) if u not in alone]
        for bucket in length_buckets([units[u][1] for u in shared]):
            index, real = _spans([units[shared[i]][:2] for i in bucket], [units[shared[i]][0] for i in bucket])
            add(AttentionCall(index), real)
        completions = [c for c in completions if c[0] not in alone]
        for bucket in _completion_buckets([n for _, _, n in completions], [units[u][1] for u, _, _ in completions]):
            members = [completions[i] for i in bucket]
            pads = [units[u][0] for u, _, _ in members]
            prompt_index, prompt_real = _spans([units[u][:2] for u, _, _ in members], pads)
            own_index, own_real = _spans([(first, n) for _, first, n in members], pads)
            longest = own_index.shape[1]
            own = torch.ones(longest, longest, dtype=torch.bool).tril()
            allowed = torch.cat([prompt_real[:, None, :].expand(-1, longest, -1),
                                 own[None].expand(len(members), -1, -1)], dim=2)[:, None]
            mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill_(~allowed, torch.finfo(mask_dtype).min)
            add(AttentionCall(own_index, torch.cat([prompt_index, own_index], dim=1), mask), own_real)
        empty = torch.zeros(0, dtype=torch.long)
        return PrefixTree(len(rows), width, tuple(calls), torch.cat(sources) if sources else empty,
                          torch.cat(targets) if targets else empty)

    @staticmethod
    def of_samples(sample_ids: Tensor, position_ids: Tensor) -> PrefixTree:
        """The tree of packed rows of whole samples side by side, each causally over itself: what the block-causal
        mask of `data.collate.collate_packed` computes. `sample_ids` [R, W] is each token's sample (-1 on padding),
        `position_ids` [R, W] restart at 0 on each sample's first token; a sample is a run of one id that starts
        there (so two neighbours with one id stay two samples)."""
        ids, positions = sample_ids.cpu(), position_ids.cpu()
        starts = (positions == 0) & (ids >= 0)  # padding's positions are 0 too: a padding run starts once, below
        starts[:, 1:] |= ids[:, 1:] != ids[:, :-1]
        starts[:, 0] = True
        width = ids.shape[1]
        rows: list[list[tuple[int, int, list]]] = [[] for _ in range(len(ids))]
        for r, start, end in _runs(starts):
            if ids[r, start] >= 0:
                rows[r].append((start, end - start, []))
        return PrefixTree.of_rows(width, rows)

    @staticmethod
    def of_segments(segment_ids: Tensor, parent_ids: Tensor, mask_dtype: torch.dtype = torch.float32) -> PrefixTree:
        """The tree of packed rows of segments (`data.collate.collate_shared_prompts`): `segment_ids` [R, W] is each
        token's segment within its row (-1 on padding), `parent_ids` [R, W] the segment it continues (its own for a
        shared prompt or a sequence alone); a segment is one run of columns. What `block_causal_mask(segment_ids,
        parents=parent_ids)` computes: a prompt causally over itself, each continuation over its prompt and its own
        past."""
        segments, parents = segment_ids.cpu(), parent_ids.cpu()
        width = segments.shape[1]
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        rows: list[list[tuple[int, int, list]]] = [[] for _ in range(len(segments))]
        unit_of: dict[tuple[int, int], tuple[int, int, list]] = {}
        for r, start, end in _runs(starts):
            segment, parent = int(segments[r, start]), int(parents[r, start])
            if segment < 0:
                continue
            if parent == segment:
                unit_of[r, segment] = (start, end - start, [])
                rows[r].append(unit_of[r, segment])
            else:
                unit_of[r, parent][2].append((start, end - start))
        return PrefixTree.of_rows(width, rows, mask_dtype)


def _runs(starts: Tensor) -> list[tuple[int, int, int]]:
    """(row, first column, end column) of every run of packed rows [R, W] whose first columns `starts` marks (every
    row's column 0 among them), in row-major order; a row's last run ends at its width."""
    row_of, column = starts.nonzero(as_tuple=True)
    ends = torch.cat([column[1:], column.new_tensor([starts.shape[1]])])
    ends[:-1][row_of[1:] != row_of[:-1]] = starts.shape[1]
    return list(zip(row_of.tolist(), column.tolist(), ends.tolist(), strict=True))


def length_buckets(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of `lengths`, longest first, in buckets whose shortest is more than half their longest: a bucket
    padded to its longest computes at most twice (per dimension) what its members need."""
    buckets: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if not buckets or 2 * lengths[i] <= lengths[buckets[-1][0]]:
            buckets.append([])
        buckets[-1].append(i)
    return buckets


def _completion_buckets(lengths: Sequence[int], prompt_lengths: Sequence[int]) -> list[list[int]]:
    """Indices of completions in `length_buckets` of their lengths, each cut again by their prompts' lengths (the
    keys are prompt + completion); completions without a token in none."""
    buckets = []
    for outer in length_buckets(lengths):
        if lengths[outer[0]]:
            buckets += [[outer[i] for i in sub] for sub in length_buckets([prompt_lengths[m] for m in outer])]
    return buckets


def _spans(spans: Sequence[tuple[int, int]], pads: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Flat indices [n, longest] of the spans (start, length), padded with `pads` (one real index per span), and
    which entries are real."""
    longest = max((length for _, length in spans), default=0)
    index = torch.tensor([[start + j if j < length else pad for j in range(longest)]
                          for (start, length), pad in zip(spans, pads, strict=True)],
                         dtype=torch.long).reshape(len(spans), longest)
    real = torch.arange(longest)[None] < torch.tensor([length for _, length in spans], dtype=torch.long)[:, None]
    return index, real


def unmaterialised_mask(rows: int, width: int, dtype: torch.dtype) -> Tensor:
    """The [R, 1, W, W] attention mask of a forward whose every layer takes its `PrefixTree`, without R * W^2 of
    memory (a group of G completions of C tokens after a P-token prompt is one row of W = P + G * C, a dense mask
    of 4 W^2 bytes: 1 GB at W = 16,000): one NaN seen through a view. transformers hands a 4-D mask to the
    attention function as it is; a layer that computed with it instead of the tree would give NaN, so
    `cpu_attention` refuses that (`is_unmaterialised`) rather than compute."""
    return torch.full((1, 1, 1, 1), float("nan"), dtype=dtype).expand(rows, 1, width, width)


def is_unmaterialised(mask: Tensor | None) -> bool:
    return (isinstance(mask, Tensor) and mask.dim() == 4 and mask.is_floating_point()
            and mask.untyped_storage().nbytes() == mask.element_size() and bool(mask[0, 0, 0, 0].isnan()))


Attend = Callable[..., tuple[Tensor, Tensor | None]]
"""transformers' attention-function signature: (module, query, key, value, attention_mask, **kwargs) ->
(output [B, L, H, D], weights or None)."""


def applies(tree: PrefixTree | None, query: Tensor, kwargs: dict) -> bool:
    """Whether `prefix_tree_attention` computes this attention call exactly: a tree of this forward's rows, on the
    CPU, in a layer whose attention is plain softmax attention under the block mask (no sliding window, soft-cap,
    sinks or position bias, which the dense mask or the kernel would add)."""
    return (tree is not None and query.device.type == "cpu" and query.dim() == 4
            and (query.shape[0], query.shape[2]) == (tree.rows, tree.width)
            and all(kwargs.get(name) is None for name in ("sliding_window", "softcap", "s_aux", "position_bias")))


def prefix_tree_attention(attend: Attend, module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          tree: PrefixTree, **kwargs) -> tuple[Tensor, None]:
    """The attention output [R, W, H, Dv] of query [R, H, W, D], key [R, Hkv, W, D] and value [R, Hkv, W, Dv] under
    the tree's block mask, computed by `attend` (the model's SDPA function) over the prompt copies and the
    completions. (Dv differs from D in multi-head latent attention: DeepSeek-V2/V3, MiniCPM3.)"""
    rows, heads, width, _ = query.shape
    value_dim = value.shape[-1]
    kwargs.pop("is_causal", None)  # set here for each call: causal over itself, or against its gathered keys

    # [R, H, W, D] -> [R * W, H, D]; no copy where `states` is a transposed view of a [R, W, H, D] tensor
    def flat(states: Tensor) -> Tensor:
        return states.transpose(1, 2).reshape(rows * width, states.shape[1], states.shape[-1])

    def unflat(states: Tensor, index: Tensor) -> Tensor:  # [n * L, H, D] -> [n, H, L, D]
        return states.view(*index.shape, *states.shape[1:]).transpose(1, 2)

    key_indices = [call.queries if call.keys is None else call.keys for call in tree.calls]
    key_rows = [index.flatten() for index in key_indices]  # the keys' and the values' rows alike
    queries = _gathers(flat(query), [call.queries.flatten() for call in tree.calls])
    keys, values = _gathers(flat(key), key_rows), _gathers(flat(value), key_rows)
    outputs = []
    for call, index, q, k, v in zip(tree.calls, key_indices, queries, keys, values, strict=True):
        output, _ = attend(module, unflat(q, call.queries), unflat(k, index), unflat(v, index), call.mask,
                           is_causal=call.keys is None, **kwargs)
        outputs.append(output.reshape(-1, heads, value_dim))
    computed = torch.cat(outputs)
    # in place into fresh zeros (the padding slots' value): the out-of-place index_copy would copy them first
    out = computed.new_zeros(rows * width, heads, value_dim).index_copy_(0, tree.targets,
                                                                        computed.index_select(0, tree.sources))
    return out.view(rows, width, heads, value_dim), None


def _gathers(states: Tensor, indices: list[Tensor]) -> Iterator[Tensor]:
    """The rows of `states` at each of `indices`, in turn: through one `_GatherRows` where autograd records them, one
    `index_select` at a time otherwise (the no-grad passes: a call's rows live only while its attention runs)."""
    if torch.is_grad_enabled() and states.requires_grad:
        yield from _GatherRows.apply(states, *indices)
    else:
        yield from (states.index_select(0, index) for index in indices)


class _GatherRows(torch.autograd.Function):
    """The rows of `states` [N, ...] at each of the flat `indices`, one tensor per index. The backward sums every
    gather's gradient into one zeroed [N, ...] buffer (`index_add_`), where autograd would zero a buffer per gather
    and then add them up: a tree's calls gather each layer's query, key and value once per call. One layer's forward
    + backward over a GRPO batch's tree (2,450 tokens, 4 calls), bf16, alternated in one process on a Zen 5 EPYC:
    38.8 against 44.4 ms (35.8 against 41.8 with the fp32 flash kernel), the in-place output scatter included."""

    @staticmethod
    def forward(ctx, states: Tensor, *indices: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)  # a gather whose output gets no gradient adds nothing
        ctx.save_for_backward(*indices)
        ctx.rows = states.shape[0]
        return tuple(states.index_select(0, index) for index in indices)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        indices = ctx.saved_tensors
        total = None
        for index, grad in zip(indices, grads, strict=True):
            if grad is None:
                continue
            if total is None:
                total = grad.new_zeros((ctx.rows, *grad.shape[1:]))
            total.index_add_(0, index, grad)
        return (total, *[None] * len(indices))
