"""Model state for one generation: prefill the prompts, then advance every row one token per step.

Two implementations behind one small interface, picked by `make_decoder`:

- `LlamaDecoder` runs the Llama decoder layers itself (calling the model's own norm, projection and
  MLP modules, so LoRA layers and biases still apply) over a KV cache it preallocates once. Prefill
  is *unpadded*: the linear layers see only the real prompt tokens, packed into one [N, hidden]
  matrix, and each distinct prompt is prefilled once even when sampled n times. Only the last
  position's logits are computed. On the small benchmark model this is ~2x `transformers.generate`.
- `HFDecoder` calls `model(...)` with the model's own cache: any causal LM, left-padded prefill.

Both feed the same positions (counted from each row's first real token) and masks, so they
sample the same tokens, and the trainer's padded recompute gives the same logprobs.
"""

from __future__ import annotations

import abc
import inspect
import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.rollout.base import position_ids_from_mask

FORWARDS = ("auto", "llama", "hf")


class Decoder(abc.ABC):
    """The state of one batched generation (rows = prompts[rows[b]] for b in range(B))."""

    @abc.abstractmethod
    def prefill(self) -> Tensor:
        """Run the prompts; return the logits [B, V] that predict each row's first new token."""

    @abc.abstractmethod
    def step(self, tokens: Tensor) -> Tensor:
        """Append one token per row [B]; return the logits [B, V] for the next one."""


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


def supports_llama_decoder(model: torch.nn.Module) -> bool:
    """Whether `LlamaDecoder` computes exactly what this model's forward does."""
    base = base_causal_lm(model)
    config = getattr(base, "config", None)
    return (getattr(config, "model_type", None) == "llama" and getattr(config, "hidden_act", None) == "silu"
            and getattr(config, "pretraining_tp", 1) == 1 and hasattr(base, "lm_head")
            and hasattr(getattr(base, "model", None), "rotary_emb"))


def make_decoder(forward: str, model: torch.nn.Module, prompts: list[list[int]], rows: Tensor,
                 max_new_tokens: int, pad_id: int) -> Decoder:
    """`forward`: "llama" (own Llama forward + static cache), "hf" (the model's forward), "auto" (llama if it can)."""
    if forward not in FORWARDS:
        raise ValueError(f"forward must be one of {', '.join(FORWARDS)}, got {forward!r}")
    if forward == "llama" and not supports_llama_decoder(model):
        raise ValueError("forward='llama' needs a Llama-architecture model (silu MLP, RoPE); use 'hf' or 'auto'")
    if forward == "llama" or (forward == "auto" and supports_llama_decoder(model)):
        return LlamaDecoder(model, prompts, rows, max_new_tokens)
    return HFDecoder(model, prompts, rows, pad_id)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE, rotate-half form, written as in transformers' Llama so the rounding matches."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def length_groups(lengths: list[int], groups: int) -> list[tuple[int, int, int]]:
    """Split ascending `lengths` into at most `groups` contiguous runs: (start, end, longest) each.

    Attention reads every key slot of its batch, padding included, and at decode time it is
    memory-bound: attending per group of similar lengths reads each group's own width, not the
    batch's longest prompt (about a third less for the few-shot benchmark prompts).
    """
    count = len(lengths)
    bounds = sorted({round(i * count / groups) for i in range(groups + 1)})
    return [(a, b, lengths[b - 1]) for a, b in itertools.pairwise(bounds) if b > a]


class LlamaDecoder(Decoder):
    """Llama forward over a preallocated KV cache [B, kv_heads, P + max_new_tokens, head_dim].

    Rows are kept internally sorted by prompt length (`order`; the interface stays in the caller's
    row order) and attention runs per group of similar lengths (`length_groups`). Cache layout:
    prompt u's keys sit left-padded in slots [P - len_u, P), new token s in slot P + s; `valid`
    [B, S] marks the slots a row may attend to. Masked prompt slots hold zeros, never garbage:
    a NaN there times a 0 attention weight would still be NaN.
    """

    GROUPS = 4

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], rows: Tensor, max_new_tokens: int) -> None:
        base = base_causal_lm(model)
        self.trunk, self.lm_head = base.model, base.lm_head
        self.layers = list(self.trunk.layers)
        config = base.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        weight = self.trunk.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype

        # Distinct prompts sorted by length (each prefilled once, even when sampled n times), and
        # the batch rows sorted the same way, so that rows of similar length are neighbours.
        lengths = [len(p) for p in prompts]
        by_length = sorted(range(len(prompts)), key=lambda u: lengths[u])
        rank = {u: i for i, u in enumerate(by_length)}
        external = rows.tolist()
        order = sorted(range(len(external)), key=lambda b: (rank[external[b]], b))
        self.order = torch.tensor(order, device=self.device)
        self.inverse = torch.argsort(self.order)
        self.prompts = [prompts[u] for u in by_length]
        self.prompt_lengths = torch.tensor([lengths[u] for u in by_length], device=self.device)
        self.row_prompt = torch.tensor([rank[external[b]] for b in order], device=self.device)
        self.width = max(lengths)  # P
        self.prompt_groups = length_groups([lengths[u] for u in by_length], self.GROUPS)
        self.row_groups = length_groups([lengths[external[b]] for b in order], self.GROUPS)

        batch, slots = len(order), self.width + max_new_tokens
        shape = (batch, self.kv_heads, slots, self.head_dim)
        # Uninitialised on purpose (zeroing it costs ~4% of a generation): prefill writes every prompt
        # slot, padding included (zeros), and decoding writes slot P + s before anything reads it.
        self.keys = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.values = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.valid = torch.zeros((batch, slots), dtype=torch.bool, device=self.device)
        self.positions = self.prompt_lengths[self.row_prompt].clone()  # the next token's position, per row
        self.slot = self.width  # the next token's cache slot (the same for every row)

    def _attend(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scale: float,
                groups: list[tuple[int, int, int]], end: int) -> Tensor:
        """Attention per length group over cache columns [P - longest, end): [n, heads, q, D] -> same."""
        if self.kv_heads != self.heads:  # grouped-query attention: each kv head serves a group of heads
            keys = keys.repeat_interleave(self.heads // self.kv_heads, dim=1)
            values = values.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = torch.empty_like(query)  # every slot read afterwards is written by one group
        queries_from = end - query.shape[2]
        for a, b, longest in groups:
            first = self.width - longest
            q_first = max(first, queries_from) - queries_from
            out[a:b, :, q_first:] = F.scaled_dot_product_attention(
                query[a:b, :, q_first:], keys[a:b, :, first:end], values[a:b, :, first:end],
                attn_mask=mask[a:b, :, q_first:, first:end], scale=scale)
        return out

    def prefill(self) -> Tensor:
        n_prompts, width = len(self.prompts), self.width
        tokens = torch.tensor([t for p in self.prompts for t in p], device=self.device)
        owner = torch.repeat_interleave(torch.arange(n_prompts, device=self.device), self.prompt_lengths)
        starts = torch.cumsum(self.prompt_lengths, 0) - self.prompt_lengths
        positions = torch.arange(len(tokens), device=self.device) - starts[owner]
        slots = width - self.prompt_lengths[owner] + positions  # left-padded column of each packed token
        prompt_valid = torch.zeros((n_prompts, width), dtype=torch.bool, device=self.device)
        prompt_valid[owner, slots] = True
        # Causal over the padded layout, keys restricted to real tokens; padding queries attend to
        # themselves only (an all-masked row would be NaN) and their outputs are never read.
        causal = torch.ones((width, width), dtype=torch.bool, device=self.device).tril()
        eye = torch.eye(width, dtype=torch.bool, device=self.device)
        mask = ((causal & prompt_valid[:, None, :]) | eye).unsqueeze(1)  # [U, 1, P, P]

        hidden = self.trunk.embed_tokens(tokens)  # [N, hidden]: real tokens only, no padding
        cos, sin = self.trunk.rotary_emb(hidden, positions.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [N, 1, head_dim]
        for layer, keys, values in zip(self.layers, self.keys, self.values, strict=True):
            attn = layer.self_attn
            normed = layer.input_layernorm(hidden)
            q = _rotate(attn.q_proj(normed).view(-1, self.heads, self.head_dim), cos, sin)
            k = _rotate(attn.k_proj(normed).view(-1, self.kv_heads, self.head_dim), cos, sin)
            v = attn.v_proj(normed).view(-1, self.kv_heads, self.head_dim)
            padded_q = q.new_zeros((n_prompts, width, self.heads, self.head_dim))
            padded_k = k.new_zeros((n_prompts, width, self.kv_heads, self.head_dim))
            padded_v = v.new_zeros((n_prompts, width, self.kv_heads, self.head_dim))
            padded_q[owner, slots], padded_k[owner, slots], padded_v[owner, slots] = q, k, v
            padded_k, padded_v = padded_k.transpose(1, 2), padded_v.transpose(1, 2)  # [U, kv_heads, P, D]
            out = self._attend(padded_q.transpose(1, 2), padded_k, padded_v, mask, attn.scaling,
                               self.prompt_groups, width)
            out = out.transpose(1, 2)[owner, slots].reshape(len(tokens), -1)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            keys[:, :, :width] = padded_k[self.row_prompt]
            values[:, :, :width] = padded_v[self.row_prompt]
        self.valid[:, :width] = prompt_valid[self.row_prompt]
        last = starts + self.prompt_lengths - 1
        logits = self.lm_head(self.trunk.norm(hidden[last]))  # only the positions that predict
        return logits[self.row_prompt][self.inverse]

    def step(self, tokens: Tensor) -> Tensor:
        slot, batch = self.slot, len(tokens)
        self.valid[:, slot] = True
        mask = self.valid[:, None, None, :]  # [B, 1, 1, S]
        hidden = self.trunk.embed_tokens(tokens[self.order])  # [B, hidden], rows in length order
        cos, sin = self.trunk.rotary_emb(hidden, self.positions.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)
        for layer, keys, values in zip(self.layers, self.keys, self.values, strict=True):
            attn = layer.self_attn
            normed = layer.input_layernorm(hidden)
            q = _rotate(attn.q_proj(normed).view(batch, self.heads, self.head_dim), cos, sin)
            keys[:, :, slot] = _rotate(attn.k_proj(normed).view(batch, self.kv_heads, self.head_dim), cos, sin)
            values[:, :, slot] = attn.v_proj(normed).view(batch, self.kv_heads, self.head_dim)
            out = self._attend(q.unsqueeze(2), keys, values, mask, attn.scaling, self.row_groups, slot + 1)
            hidden = hidden + attn.o_proj(out.reshape(batch, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        self.slot += 1
        self.positions += 1
        return self.lm_head(self.trunk.norm(hidden))[self.inverse]


class HFDecoder(Decoder):
    """The model's own forward and cache: works for any causal LM, with a left-padded prefill."""

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], rows: Tensor, pad_id: int) -> None:
        self.model = model
        device = next(model.parameters()).device
        self.input_ids, self.attention_mask = left_pad([prompts[r] for r in rows.tolist()], pad_id, device)
        self.positions = position_ids_from_mask(self.attention_mask)
        # transformers 5 renamed `past_key_values` to `cache` (argument and output field).
        parameters = inspect.signature(base_causal_lm(model).forward).parameters
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self.cache = None

    def _forward(self, input_ids: Tensor) -> Tensor:
        cache = {self.cache_arg: self.cache} if self.cache is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=self.attention_mask, position_ids=self.positions,
                         use_cache=True, logits_to_keep=1, **cache)
        self.cache = out[self.cache_arg]
        return out.logits[:, -1]

    def prefill(self) -> Tensor:
        return self._forward(self.input_ids)

    def step(self, tokens: Tensor) -> Tensor:
        ones = self.attention_mask.new_ones((len(tokens), 1))
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        self.positions = self.positions[:, -1:] + 1
        return self._forward(tokens.unsqueeze(1))
