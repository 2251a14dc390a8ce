"""Model state for one generation: prefill the prompts, then advance every row one token per step.

Two implementations behind one small interface, picked by `make_decoder`:

- `LlamaDecoder` runs the Llama decoder layers itself (calling the model's own norm and projection
  modules, so LoRA layers and biases still apply) over a KV cache it preallocates once. Prefill
  is *unpadded*: the linear layers see only the real prompt tokens, packed into one [N, hidden]
  matrix, and each distinct prompt is prefilled once even when sampled n times. Only the last
  position's logits are computed. Its linear layers run through oneDNN with each weight packed
  once per generation (`posttrain.rollout.gemm`); decode attention is plain batched matmuls or, where it builds and
  measured faster, a C++ kernel (`posttrain.rollout.decode_attention`). On the small benchmark model it is ~3x
  `transformers.generate` (benchmarks/generate.py).
- `HFDecoder` calls `model(...)` with the model's own cache: any causal LM, left-padded prefill.

Both feed the same positions (counted from each row's first real token) and masks, so they
sample the same tokens, and the trainer's padded recompute gives the same logprobs.
"""

from __future__ import annotations

import abc
import inspect
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.errors import ConfigError
from posttrain.models.attention import sliding_window
from posttrain.models.heads import forward_keeping
from posttrain.models.precision import autocast_dtype
from posttrain.rollout.base import position_ids_from_mask
from posttrain.rollout.decode_attention import decode_attention, left_padding_bias
from posttrain.rollout.gemm import LinearRunner

FORWARDS = ("auto", "llama", "hf")


class Decoder(abc.ABC):
    """The state of one batched generation: `n` rows per prompt, prompt-major (row b samples prompt b // n)."""

    @abc.abstractmethod
    def prefill(self) -> Tensor:
        """Run the prompts; return the logits [B, V] that predict each row's first new token."""

    @abc.abstractmethod
    def step(self, tokens: Tensor) -> Tensor:
        """Append one token per row [B]; return the logits [B, V] for the next one."""

    # Drop finished rows from the batch once at most this share of the computed ones is left: compacting copies
    # the caches (a few decode steps' reads at most), so it is worth it only in steps. Multistep chains (96 new tokens,
    # completions of 48 on average), one thread of the AVX2-only EPYC: 0.75 and 0.5 sampled 500 greedy completions in
    # 4.3-4.4 s, 0.9 in 4.4-5.0, never compacting 5.4-5.6; 256 prompts x 4 samples 5.7-5.9 s against 7.4-8.8.
    COMPACT_AT = 0.75

    def release(self, done: Tensor) -> None:  # noqa: B027 (optional: a decoder that cannot drop rows keeps them)
        """`done` [B] marks the rows whose completions have ended: the decoder may stop computing them, and their
        logits from then on are zeros (a finite placeholder: the sampler still draws for every row, so the draws
        of the others do not depend on who has finished). By default every row is computed to the end."""


def _every_row(logits: Tensor, rows: Tensor, count: int) -> Tensor:
    """The logits of the computed `rows` (the caller's row indices) in a [count, V] tensor, zeros elsewhere."""
    every = logits.new_zeros((count, logits.shape[1]))
    every[rows] = logits
    return every


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Left-pad token lists into (input_ids [B, P], attention_mask [B, P]), so all prompts end together."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def base_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers are injected in place, so they stay)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


# Architectures whose decoder layers are Llama's, module for module (RMSNorm, RoPE from the model's own rotary
# embedding, q/k/v/o projections with or without biases, a gated MLP), and which differ from it at most by a sliding
# attention window and a norm of each head's query and key: Qwen2 has q/k/v biases, Mistral a window, Qwen3 an
# RMSNorm over each head's query and key before RoPE (`q_norm`, `k_norm`, applied by `_head_norm`).
LLAMA_LIKE = ("llama", "qwen2", "mistral", "qwen3")


def supports_llama_decoder(model: torch.nn.Module, length: int | None = None) -> bool:
    """Whether `LlamaDecoder` computes exactly what this model's forward does on sequences of up to `length`
    tokens (prompt and completion): a sliding window is full attention while it covers the whole sequence (a
    query attends to the keys less than `window` positions back), and `None` means any length."""
    base = base_causal_lm(model)
    config = getattr(base, "config", None)
    window = getattr(config, "sliding_window", None)
    return (getattr(config, "model_type", None) in LLAMA_LIKE and getattr(config, "hidden_act", None) == "silu"
            and getattr(config, "pretraining_tp", 1) == 1 and hasattr(base, "lm_head")
            and hasattr(getattr(base, "model", None), "rotary_emb")
            and (window is None or (length is not None and window >= length)))


def prompt_learning(model: torch.nn.Module) -> Any | None:
    """The peft config of `model`'s active prompt-learning adapter (prefix or prompt tuning: virtual tokens), or
    None when it has none."""
    config = getattr(model, "active_peft_config", None)
    return config if getattr(config, "is_prompt_learning", False) else None


def make_decoder(forward: str, model: torch.nn.Module, prompts: list[list[int]], n: int,
                 max_new_tokens: int, pad_id: int, onednn: bool = True) -> Decoder:
    """`forward`: "llama" (own Llama forward + static cache), "hf" (the model's forward), "auto" (llama if it can).
    `onednn`: the Llama decoder's linear layers through oneDNN (`posttrain.rollout.gemm`)."""
    if forward not in FORWARDS:
        raise ValueError(f"forward must be one of {', '.join(FORWARDS)}, got {forward!r}")
    peft_config = prompt_learning(model)
    # Under peft's `disable_adapter()` a prompt-learning model is its base model (`_adapters_disabled`).
    if peft_config is not None and not getattr(model, "_adapters_disabled", False):
        if peft_config.peft_type == "PREFIX_TUNING":  # peft's PeftType is a str enum
            return PrefixDecoder(model, prompts, n, max_new_tokens, pad_id)
        # Prompt tuning and p-tuning prepend virtual token embeddings to each forward's inputs: a decode step's
        # inputs too, so a cached decode would sample from the wrong distribution without a sound.
        raise ConfigError("the rollout engine does not support prompt-tuning adapters (prefix-tuning and LoRA it "
                          "does)")
    fits = supports_llama_decoder(model, max(map(len, prompts)) + max_new_tokens)
    if forward == "llama" and not fits:
        raise ValueError(f"forward='llama' needs a model of Llama's architecture ({', '.join(LLAMA_LIKE)}: silu MLP, "
                         "RoPE, no sliding window shorter than the sequence); use 'hf' or 'auto'")
    if forward == "llama" or (forward == "auto" and fits):
        return LlamaDecoder(model, prompts, n, max_new_tokens, onednn)
    return HFDecoder(model, prompts, n, pad_id)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE, x * cos + rotate_half(x) * sin, as transformers' Llama computes it (same rounding, same dtype), with
    two temporaries instead of four (and the cast below where x is narrower than cos): at prefill each is a
    [tokens, heads, head_dim] tensor.

    In the wider of the two dtypes, as transformers' products promote: under bf16 autocast the projections are
    bf16 and cos/sin fp32 (the residual stream's), so the result is fp32, as the trainer's forward has it. Casting
    once first also keeps every op in one dtype: in-place mixed-dtype ops take a slow path on CPU (the benchmark's
    bf16 generation: 4.0 ms against 2.3 for the queries of a 3,300-token prefill, 51 µs against 29 a decode step).
    """
    x = x.to(torch.promote_types(x.dtype, cos.dtype))
    half = x.shape[-1] // 2
    rotated = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    rotated[..., :half].neg_()
    return rotated.mul_(sin).add_(x * cos)


def _head_norm(attn: torch.nn.Module, name: str, x: Tensor) -> Tensor:
    """`x` [..., heads, head_dim] through the attention's per-head norm `name` (Qwen3's q_norm / k_norm, before
    RoPE as its forward does), or unchanged where the architecture has none (Llama, Qwen2, Mistral)."""
    norm = getattr(attn, name, None)
    return x if norm is None else norm(x)


def _projections(module: torch.nn.Module, names) -> list[torch.nn.Module]:
    """`module.<name>_proj` for each name: the linear layers of a Llama attention or MLP block."""
    return [getattr(module, f"{name}_proj") for name in names]


def length_groups(lengths: list[int], groups: int) -> list[tuple[int, int, int]]:
    """Split ascending `lengths` into at most `groups` contiguous runs: (start, end, longest) each.

    Decode-time attention is memory-bound and reads every key slot of its batch, padding
    included: attending per group of similar lengths reads each group's own width, not the
    longest prompt's (about a third less for the few-shot benchmark prompts).
    """
    count = len(lengths)
    bounds = sorted({round(i * count / groups) for i in range(groups + 1)})
    return [(a, b, lengths[b - 1]) for a, b in itertools.pairwise(bounds) if b > a]


def right_aligned(cache: Tensor, rows: Tensor, width: int) -> Tensor:
    """The `rows` of a left-padded prompt cache [prompts, kv, P, D] with their last `width` slots, left-padded with
    zeros where it has fewer: moved to another width, real slots last (cut or padded after taking the rows, so that
    only theirs are copied)."""
    have = cache.shape[2]
    if have >= width:
        return cache[:, :, have - width:][rows]
    return F.pad(cache[rows], (0, 0, width - have, 0))


# For each new group: its width and, in the prompts' order, (old group, the rows of that group's caches it takes).
RegroupPlan = list[tuple[int, list[tuple[int, Tensor]]]]


def regroup_plan(groups: list[tuple[int, int, int]], keep: Tensor,
                 new_groups: list[tuple[int, int, int]]) -> RegroupPlan:
    """Where each of `new_groups` (over the kept prompts) takes its prompts from: `groups` held prompts [a, b) in
    group g's caches, `keep` are the kept prompts (ascending)."""
    starts = torch.tensor([a for a, _, _ in groups], device=keep.device)
    owner = torch.bucketize(keep, starts, right=True) - 1  # each kept prompt's old group
    plan = []
    for a, b, longest in new_groups:
        members, owners = keep[a:b], owner[a:b]
        plan.append((longest, [(g, members[owners == g] - groups[g][0])
                               for g in owners.unique().tolist()]))  # ascending: the prompts' order
    return plan


def regroup(caches: list[Tensor], plan: RegroupPlan) -> list[Tensor]:
    """Per-group prompt caches (right-aligned in each group's width) laid out as `plan` says: one contiguous tensor
    per new group, as decode attention reads them fastest."""
    return [torch.cat([right_aligned(caches[g], rows, width) for g, rows in sources]) for width, sources in plan]


class LlamaDecoder(Decoder):
    """Llama forward over preallocated KV caches: one per prompt, shared by its n rows, and one per row
    for the new tokens.

    Internally the prompts are sorted by length, each prompt's n rows next to each other
    (`order` maps internal to caller rows; the interface keeps the caller's order), so that decode
    attention can run per group of prompts of similar lengths (`groups`: (start, end, longest) over the
    internal prompts). Each group has its own prompt caches [prompts, kv_heads, P, head_dim] with P its
    longest prompt: a prompt's keys sit left-padded in slots [P - len, P), the group's `prompt_bias`
    [prompts, P] is 0 on them and -inf on the padding (which holds zeros, never garbage: NaN times a 0 weight
    is NaN). Contiguous per group because a batched product over a slot range of one wider cache (a strided
    view) took 7.3 ms a decode step against 4.7 (prompt part, 8 layers x 4 groups of 16 prompts, fp32).
    New-token cache [B, kv_heads, max_new_tokens, head_dim]: token s in slot s, the same for every row.
    A group of n samples reads its prompt's keys and values once per step instead of n times.
    """

    GROUPS = 4
    PROMPTS_PER_GROUP = 16  # fewer prompts per group: the per-call cost of the extra products outweighs the width saved

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], n: int, max_new_tokens: int,
                 onednn: bool = True) -> None:
        base = base_causal_lm(model)
        self.trunk, self.lm_head = base.model, base.lm_head
        self.layers = list(self.trunk.layers)
        config = base.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        weight = self.trunk.embed_tokens.weight
        # Under bf16 autocast the linear products (and the prefill's attention) are bf16; the residual
        # stream, the norms, the KV caches and decode attention stay in the weights' dtype: bf16 products over
        # the contiguous prompt caches were slower, half the bytes notwithstanding (at best 5.2-5.4 against 4.7
        # ms a decode step, 8 layers x 4 groups of 16 prompts), and oneDNN's bf16 bmm copies a strided operand
        # (the new tokens' slot range) first, which costs more than it saves (bf16 caches with bf16 products again in
        # the eighteenth session: a whole GRPO-shaped decode step 17.1 against 14.5 ms). The fp32 caches are also
        # what the C++ decode attention reads (`rollout.decode_attention`).
        self.device, self.dtype = weight.device, weight.dtype
        self.linear_dtype = autocast_dtype(self.device) or weight.dtype
        self.attend = decode_attention(self.device, self.dtype, self.head_dim)  # torch's products or the C++ kernel

        by_length = sorted(range(len(prompts)), key=lambda u: len(prompts[u]))
        self.n, self.prompts = n, [prompts[u] for u in by_length]
        self.prompt_lengths = torch.tensor([len(p) for p in self.prompts], device=self.device)
        order = [by_length[r // n] * n + r % n for r in range(len(prompts) * n)]
        self.order = torch.tensor(order, device=self.device)  # internal row -> caller's row
        self.inverse = torch.argsort(self.order)  # caller's row -> internal row
        self.rows = len(order)  # B, the caller's rows; `order` shrinks to the computed ones once some are released
        self.groups = self._length_groups(self.prompt_lengths.tolist())

        batch, kv, dim = len(order), self.kv_heads, self.head_dim
        # Uninitialised on purpose (zeroing costs ~4% of a generation): prefill writes every prompt
        # slot, padding included, and decoding writes new slot s before anything reads it.
        def prompt_caches() -> list[Tensor]:
            return [torch.empty((b - a, kv, longest, dim), device=self.device, dtype=self.dtype)
                    for a, b, longest in self.groups]

        self.prompt_keys = [prompt_caches() for _ in self.layers]  # [layer][group]
        self.prompt_values = [prompt_caches() for _ in self.layers]
        new_shape = (batch, kv, max_new_tokens, dim)
        self.new_keys = [torch.empty(new_shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.new_values = [torch.empty(new_shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.prompt_bias = self._prompt_bias()
        self.positions = self.prompt_lengths.repeat_interleave(n)  # the next token's position, per row
        self.slot = 0  # the next new token's slot (the same for every row)
        linears = [m for layer in self.layers for m in (*_projections(layer.self_attn, "qkvo"),
                                                         *_projections(layer.mlp, ("gate", "up", "down")))]
        # q/k/v and gate/up as one product each: at a decode step's 64 rows 236 against 273 us and 414 against 433 in
        # fp32, 126 against 157 and 214 against 232 in bf16 (the small model's shapes, 2 threads, Zen 5)
        together = [group for layer in self.layers
                    for group in (_projections(layer.self_attn, "qkv"), _projections(layer.mlp, ("gate", "up")))]
        self.linear = LinearRunner([*linears, self.lm_head], batch_hint=batch, onednn=onednn,
                                   dtype=self.linear_dtype, fused=together)

    def _prompt_bias(self) -> list[Tensor]:
        """Per length group, the additive mask of its prompt caches (`left_padding_bias`)."""
        return [left_padding_bias(self.prompt_lengths[a:b], longest, self.dtype) for a, b, longest in self.groups]

    def _length_groups(self, lengths: list[int]) -> list[tuple[int, int, int]]:
        """The decode-attention groups of the computed prompts (ascending `lengths`)."""
        return length_groups(lengths, max(1, min(self.GROUPS, len(lengths) // self.PROMPTS_PER_GROUP)))

    def release(self, done: Tensor) -> None:
        """Stop computing the prompts whose n rows have all ended, once few enough are left (`COMPACT_AT`): their
        caches, positions and rows leave the batch (a prompt's rows stay together, as the shared prompt cache
        needs)."""
        prompt_done = done[self.order].view(-1, self.n).all(dim=1)  # per computed prompt, internal order
        keep = (~prompt_done).nonzero().flatten()
        if len(keep) > self.COMPACT_AT * len(prompt_done) or len(keep) == 0:
            return
        rows = (keep[:, None] * self.n + torch.arange(self.n, device=self.device)).flatten()
        for caches in (self.new_keys, self.new_values):
            caches[:] = [cache[rows] for cache in caches]
        self.positions, self.order = self.positions[rows], self.order[rows]
        self.prompt_lengths = self.prompt_lengths[keep]
        groups = self._length_groups(self.prompt_lengths.tolist())  # a subset of sorted lengths: still sorted
        plan = regroup_plan(self.groups, keep, groups)
        for caches in (*self.prompt_keys, *self.prompt_values):
            caches[:] = regroup(caches, plan)
        self.groups = groups
        self.prompt_bias = self._prompt_bias()

    def _logits(self, hidden: Tensor) -> Tensor:
        """The next-token logits [B, V] in the caller's row order from the computed rows' last hidden states; zeros
        for the released rows."""
        logits = self.linear(self.lm_head, self.trunk.norm(hidden))
        return logits[self.inverse] if len(self.order) == self.rows else _every_row(logits, self.order, self.rows)

    def _mlp(self, layer: torch.nn.Module, hidden: Tensor) -> Tensor:
        """down(silu(gate(x)) * up(x)) with the activation (and, where its input is contiguous, the product) in place
        (large at prefill)."""
        mlp, linear = layer.mlp, self.linear
        gate, up = linear.each([mlp.gate_proj, mlp.up_proj], hidden)
        activation = F.silu(gate, inplace=True)
        # Gate and up as column views of one product (`LinearRunner`'s fused groups): the product out of place, for the
        # down projection's input is better contiguous (oneDNN's op would copy a strided one).
        product = activation.mul_(up) if activation.is_contiguous() else torch.mul(activation, up)
        return linear(mlp.down_proj, product)

    def _expand_heads(self, kv: Tensor, dim: int) -> Tensor:
        """Grouped-query attention: each key/value head serves heads // kv_heads query heads."""
        return kv if self.kv_heads == self.heads else kv.repeat_interleave(self.heads // self.kv_heads, dim=dim)

    def prefill(self) -> Tensor:
        """Unpadded: the linear layers see only the real prompt tokens, packed into [N, hidden], and
        attention runs per prompt (causal, no mask, no padding). Keys and values go straight into the
        prompt's cache, which its n rows share.
        """
        lengths = self.prompt_lengths
        tokens = torch.tensor([t for p in self.prompts for t in p], device=self.device)
        owner = torch.repeat_interleave(torch.arange(len(self.prompts), device=self.device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        positions = torch.arange(len(tokens), device=self.device) - starts[owner]
        spans = list(itertools.pairwise([0, *torch.cumsum(lengths, 0).tolist()]))  # each prompt's packed tokens
        # per prompt: its group, its row in the group's caches, the group's width
        homes = [(g, u - a, longest) for g, (a, b, longest) in enumerate(self.groups) for u in range(a, b)]

        hidden = self.trunk.embed_tokens(tokens)  # [N, hidden]
        cos, sin = self.trunk.rotary_emb(hidden, positions.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [N, 1, head_dim]
        for layer, keys, values in zip(self.layers, self.prompt_keys, self.prompt_values, strict=True):
            attn = layer.self_attn
            normed = layer.input_layernorm(hidden)
            linear = self.linear
            q, k, v = linear.each(_projections(attn, "qkv"), normed)
            q = _rotate(_head_norm(attn, "q_norm", q.view(-1, self.heads, self.head_dim)), cos, sin).transpose(0, 1)
            k = _rotate(_head_norm(attn, "k_norm", k.view(-1, self.kv_heads, self.head_dim)), cos, sin).transpose(0, 1)
            v = v.view(-1, self.kv_heads, self.head_dim).transpose(0, 1)  # [kv, N, D]
            # The cache keeps the keys as RoPE made them; the prefill's attention runs in the products' dtype (bf16
            # under autocast, as autocast would cast them for it; the same in fp32).
            q, k_product = q.to(v.dtype), k.to(v.dtype)
            out = torch.empty((len(tokens), self.heads, self.head_dim), device=self.device, dtype=v.dtype)
            for (begin, end), (g, row, width) in zip(spans, homes, strict=True):
                first = width - (end - begin)  # the prompt's first real slot in its group's cache
                for cache, new in ((keys[g], k), (values[g], v)):
                    cache[row, :, :first] = 0.0
                    cache[row, :, first:] = new[:, begin:end]
                out[begin:end] = F.scaled_dot_product_attention(  # [1, heads, len, D], causal, nothing padded
                    q[None, :, begin:end], self._expand_heads(k_product[None, :, begin:end], 1),
                    self._expand_heads(v[None, :, begin:end], 1), is_causal=True,
                    scale=attn.scaling)[0].transpose(0, 1)
            hidden = hidden.add_(linear(attn.o_proj, out.view(len(tokens), -1)))
            hidden = hidden.add_(self._mlp(layer, layer.post_attention_layernorm(hidden)))
        last = starts + lengths - 1
        logits = self.linear(self.lm_head, self.trunk.norm(hidden[last]))  # only the positions that predict
        return logits[self.inverse // self.n]

    def step(self, tokens: Tensor) -> Tensor:
        slot, batch, heads, kv_heads, dim = self.slot, len(self.order), self.heads, self.kv_heads, self.head_dim
        hidden = self.trunk.embed_tokens(tokens[self.order])  # [computed rows, hidden], internal row order
        cos, sin = self.trunk.rotary_emb(hidden, self.positions.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)
        caches = zip(self.layers, self.prompt_keys, self.prompt_values, self.new_keys, self.new_values, strict=True)
        for layer, prompt_keys, prompt_values, new_keys, new_values in caches:
            attn, linear = layer.self_attn, self.linear
            normed = layer.input_layernorm(hidden)
            q, k, v = linear.each(_projections(attn, "qkv"), normed)
            q = _rotate(_head_norm(attn, "q_norm", q.view(batch, heads, dim)), cos, sin)
            new_keys[:, :, slot] = _rotate(_head_norm(attn, "k_norm", k.view(batch, kv_heads, dim)), cos, sin)
            new_values[:, :, slot] = v.view(batch, kv_heads, dim)
            out = torch.empty((batch, heads, dim), device=self.device, dtype=self.dtype)
            with torch.autocast(self.device.type, enabled=False):
                q = q.to(self.dtype) * attn.scaling
                groups = zip(self.groups, prompt_keys, prompt_values, self.prompt_bias, strict=True)
                for (a, b, _), group_keys, group_values, bias in groups:  # each group reads only its own width
                    rows = slice(a * self.n, b * self.n)
                    out[rows] = self.attend(q[rows], group_keys, group_values, bias, self.prompt_lengths[a:b],
                                            new_keys[rows], new_values[rows], slot + 1, self.n)
            hidden = hidden.add_(linear(attn.o_proj, out.view(batch, -1)))
            hidden = hidden.add_(self._mlp(layer, layer.post_attention_layernorm(hidden)))
        self.slot += 1
        self.positions += 1
        return self._logits(hidden)


class HFDecoder(Decoder):
    """The model's own forward and cache: works for any causal LM, with a left-padded prefill."""

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], n: int, pad_id: int) -> None:
        self.model = model
        device = next(model.parameters()).device
        self.input_ids, self.attention_mask = left_pad([p for p in prompts for _ in range(n)], pad_id, device)
        self.positions = position_ids_from_mask(self.attention_mask)
        # transformers 5 renamed `past_key_values` to `cache` (argument and output field).
        parameters = inspect.signature(base_causal_lm(model).forward).parameters
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self.cache = None
        self.count = len(self.input_ids)  # B, the caller's rows
        self.rows = torch.arange(self.count, device=device)  # the computed ones (all until some are released)

    def _forward(self, input_ids: Tensor) -> Tensor:
        cache = {self.cache_arg: self.cache} if self.cache is not None else {}
        out = forward_keeping(self.model, 1, input_ids=input_ids, attention_mask=self.attention_mask,
                              position_ids=self.positions, use_cache=True, **cache)
        self.cache = out[self.cache_arg]
        return out.logits[:, -1]

    def prefill(self) -> Tensor:
        return self._forward(self.input_ids)

    def step(self, tokens: Tensor) -> Tensor:
        ones = self.attention_mask.new_ones((len(self.rows), 1))
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        self.positions = self.positions[:, -1:] + 1
        logits = self._forward(tokens[self.rows].unsqueeze(1))
        return logits if len(self.rows) == self.count else _every_row(logits, self.rows, self.count)

    def release(self, done: Tensor) -> None:
        """Drop the ended rows, once few enough are left, through the cache's `batch_select_indices` (what
        transformers' own generation uses for it); a cache without it keeps every row."""
        keep = (~done[self.rows]).nonzero().flatten()
        if (len(keep) > self.COMPACT_AT * len(self.rows) or len(keep) == 0
                or not hasattr(self.cache, "batch_select_indices")):
            return
        self.cache.batch_select_indices(keep)
        self.attention_mask, self.positions = self.attention_mask[keep], self.positions[keep]
        self.rows = self.rows[keep]


class PrefixDecoder(HFDecoder):
    """A prefix-tuned model (peft), sampled as peft's forward computes it: the base model behind the adapter's
    virtual keys and values, which every position attends to, positions offset by their count. peft's own forward
    rebuilds that prefix on every call (a decode step's cache would be dropped), so the base model runs here, its
    cache opened with the prefix once per generation."""

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], n: int, max_new_tokens: int,
                 pad_id: int) -> None:
        super().__init__(base_causal_lm(model), prompts, n, pad_id)
        virtual = model.active_peft_config.num_virtual_tokens
        window = sliding_window(base_causal_lm(model).config.get_text_config())
        lengths = [len(p) for p in prompts]
        if window is not None and min(lengths) < max(lengths) and virtual + max(lengths) + max_new_tokens > window:
            # The window counts cache columns, and the left padding sits between the prefix and a shorter prompt:
            # its virtual tokens would leave the window early (peft's forward on the row alone keeps them).
            raise ConfigError(f"prefix-tuning on a model with a sliding window of {window} tokens samples prompts of "
                              f"different lengths only when the {virtual} virtual tokens, the longest prompt "
                              f"({max(lengths)}) and max_new_tokens ({max_new_tokens}) fit in it: use LoRA, or shorter "
                              "prompts or completions")
        self.attention_mask = torch.cat([self.attention_mask.new_ones((self.count, virtual)), self.attention_mask], 1)
        self.positions = self.positions + virtual  # peft offsets the positions it is given by the prefix's length
        self.cache = model.get_prompt(self.count, max_cache_len=virtual + self.input_ids.shape[1] + max_new_tokens)
