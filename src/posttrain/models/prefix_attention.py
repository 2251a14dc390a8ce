"""Attention over a padding-free RL batch that computes only what its block mask lets through.

A padding-free rollout forward (`rollout.recompute.pack_rollout`) lays prompts and completions side by side in
rows of W tokens, each prompt once per group of its completions (`share_prompts`), and hands the model a dense
[R, 1, W, W] block mask. torch's CPU attention kernel applies a mask but still computes every (query, key) pair
it hides, so a row costs W^2 whatever it holds: a prompt of P tokens shared by G completions of C tokens costs
(P + G*C)^2 where only P^2 / 2 + G*C*(P + C) pairs are ever attended to.

`PrefixTree` is where each prompt copy and each completion lies in the flat [R * W] token axis, and
`prefix_tree_attention` computes the same attention as the dense mask from it, in two calls of the model's own
attention function: every prompt copy causally over itself ([U, Pmax] rows, no mask: the kernel's causal
path), and every completion's tokens over its prompt then its own past ([S, Cmax] queries against
[S, Pmax + Cmax] keys gathered from the flat axis; an additive mask hides the padding). The outputs go back to
the packed rows; padding slots of the rows get zeros (nothing reads them: no real token attends to a padding
slot and no loss sits on one). Gradients are exact: the gather's backward sums what every completion sent to
its shared prompt's keys and values, as the dense mask's does.

Measured on an AMD EPYC Zen 5, 2 threads, fp32, one layer's forward + backward, 8 prompts x 8 completions:
prompt 46 / completions 31 tokens 35 -> 22 ms; 200 / 128 560 -> 215 ms; 500 / 300 3050 -> 1080 ms. The dense
mask's cost also grows with the rows' width, so without this a group longer than `padding_free_capacity` is
cut into pieces, each with its own copy of the prompt; with it, the width costs attention nothing.

The dense mask stays the fallback and the reference: models whose layers run another attention (a sliding
window, soft-capping, position biases, a non-SDPA implementation), devices other than the CPU (not measured
there) and forwards that receive no tree use it, with the same numbers up to rounding (tested in float64).
A forward that keeps groups whole (`rollout.recompute.PaddingFree.whole_groups`, only for models whose every layer
takes the tree) gets no dense mask at all (`unmaterialised_mask`): its rows are as wide as a prompt and all its
completions, and a dense mask of them would cost R * W^2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# The keyword the tree travels under, from the model's forward down to its attention function (transformers
# passes a forward's extra keywords through its layers to the attention interface).
KEYWORD = "prefix_tree"


@dataclasses.dataclass(frozen=True)
class PrefixTree:
    """Where the prompts and completions of a packed [R, W] forward lie, as indices into its flat R * W tokens.

    U prompt copies of at most Pmax tokens and S completions of at most Cmax tokens; each completion follows
    one prompt copy (its `unit`). Padding entries of the index tables point at a real token (its unit's first
    prompt token) so that gathers stay in range; masks and `sources` leave them out.
    """

    rows: int
    width: int
    prompt_index: Tensor
    """[U, Pmax] flat index of each prompt copy's tokens."""
    key_index: Tensor
    """[S, Pmax + Cmax] flat index of the keys each completion sees: its prompt copy's tokens, then its own."""
    completion_index: Tensor
    """[S, Cmax] flat index of each completion's tokens."""
    completion_mask: Tensor
    """[S, 1, Cmax, Pmax + Cmax] additive, in the forward's floating dtype: completion token i sees prompt token
    p < P of its copy and its own j <= i. Additive, not boolean: SDPA turns a boolean mask into a float one in every
    layer and keeps each for the backward; one float mask is shared by all layers."""
    sources: Tensor
    """[N] positions in cat(prompt outputs [U * Pmax], completion outputs [S * Cmax]) of the real tokens..."""
    targets: Tensor
    """[N] ...and the flat index each goes back to."""

    @staticmethod
    def of_rows(width: int, rows: Sequence[Sequence[tuple[int, int, Sequence[tuple[int, int]]]]],
                mask_dtype: torch.dtype = torch.float32) -> PrefixTree:
        """The tree of packed rows of `width` tokens, given per row its units as (prompt start column, prompt
        length, [(completion start column, completion length), ...]); the mask in `mask_dtype` (the model's)."""
        units = [(r * width + start, length, [(r * width + s, n) for s, n in completions])
                 for r, row in enumerate(rows) for start, length, completions in row]
        longest_prompt = max((length for _, length, _ in units), default=0)
        completions = [(u, first, n) for u, (_, _, members) in enumerate(units) for first, n in members]
        longest_completion = max((n for _, _, n in completions), default=0)
        prompt_index = torch.tensor([[start + p if p < length else start
                                      for p in range(longest_prompt)] for start, length, _ in units],
                                    dtype=torch.long).reshape(len(units), longest_prompt)
        completion_index = torch.tensor([[first + j if j < n else units[u][0] for j in range(longest_completion)]
                                         for u, first, n in completions],
                                        dtype=torch.long).reshape(len(completions), longest_completion)
        unit_of = torch.tensor([u for u, _, _ in completions], dtype=torch.long)
        key_index = torch.cat([prompt_index[unit_of], completion_index], dim=1)
        prompt_lengths = torch.tensor([length for _, length, _ in units], dtype=torch.long)
        completion_lengths = torch.tensor([n for _, _, n in completions], dtype=torch.long)
        sees_prompt = torch.arange(longest_prompt)[None, None, :] < prompt_lengths[unit_of][:, None, None]
        own = torch.ones(longest_completion, longest_completion, dtype=torch.bool).tril()
        allowed = torch.cat([sees_prompt.expand(-1, longest_completion, -1),
                             own[None].expand(len(completions), -1, -1)], dim=2)[:, None]
        completion_mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill_(~allowed,
                                                                                   torch.finfo(mask_dtype).min)
        prompt_real = torch.arange(longest_prompt)[None] < prompt_lengths[:, None]
        completion_real = torch.arange(longest_completion)[None] < completion_lengths[:, None]
        sources = torch.cat([torch.nonzero(prompt_real.flatten()).flatten(),
                             prompt_real.numel() + torch.nonzero(completion_real.flatten()).flatten()])
        targets = torch.cat([prompt_index[prompt_real], completion_index[completion_real]])
        return PrefixTree(len(rows), width, prompt_index, key_index, completion_index, completion_mask, sources,
                          targets)

    def to(self, device: torch.device | str) -> PrefixTree:
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), Tensor)})


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
    kwargs.pop("is_causal", None)  # set here for each of the two calls

    def flat(states: Tensor) -> Tensor:  # [R, H, W, D] -> [R * W, H, D]
        return states.transpose(1, 2).reshape(rows * width, states.shape[1], states.shape[-1])

    def gathered(states: Tensor, index: Tensor) -> Tensor:  # [R * W, H, D] -> [len(index), H, L, D]
        # index_select, not states[index]: its backward is index_add, several times faster on the CPU than the
        # accumulating index_put that advanced indexing's backward runs (2.8 ms a call at the benchmark's shapes)
        return states.index_select(0, index.flatten()).view(*index.shape, *states.shape[1:]).transpose(1, 2)

    query, key, value = flat(query), flat(key), flat(value)
    outputs = []
    if tree.prompt_index.numel():
        prompt_out, _ = attend(module, gathered(query, tree.prompt_index), gathered(key, tree.prompt_index),
                               gathered(value, tree.prompt_index), None, is_causal=True, **kwargs)
        outputs.append(prompt_out.reshape(-1, heads, value_dim))
    if tree.completion_index.numel():
        completion_out, _ = attend(module, gathered(query, tree.completion_index), gathered(key, tree.key_index),
                                   gathered(value, tree.key_index), tree.completion_mask, is_causal=False, **kwargs)
        outputs.append(completion_out.reshape(-1, heads, value_dim))
    computed = torch.cat(outputs)
    out = computed.new_zeros(rows * width, heads, value_dim).index_copy(0, tree.targets,
                                                                       computed.index_select(0, tree.sources))
    return out.view(rows, width, heads, value_dim), None
