"""The in-process rollout engine: samples with the policy module itself, batched, with a KV cache."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from posttrain.data.tokenize import turn_end_ids
from posttrain.errors import ConfigError
from posttrain.models.attention import position_limit
from posttrain.rollout.base import FinishReason, Prompts, Rollout, RolloutEngine, SamplingParams
from posttrain.rollout.forward import FORWARDS, left_pad, make_decoder, prompt_learning
from posttrain.rollout.sampling import row_generators, sample_next


def prompt_token_lists(prompts: Prompts) -> list[list[int]]:
    """Token id lists from lists or from a tokenizer batch (its attention_mask picks the real tokens)."""
    if isinstance(prompts, Mapping):
        ids, mask = _lists(prompts["input_ids"]), _lists(prompts.get("attention_mask"))
        if ids and not isinstance(ids[0], (list, tuple)):
            ids, mask = [ids], None if mask is None else [mask]  # one prompt's encoding: tokenizer(text)
        mask = [[1] * len(row) for row in ids] if mask is None else mask
        if len(mask) != len(ids) or any(len(m) != len(row) for row, m in zip(ids, mask, strict=False)):
            raise ValueError("the prompts' attention_mask does not match their input_ids row for row")
        # Rows may be ragged (a tokenizer batch without padding): each row's own mask picks its tokens.
        lists = [[int(t) for t, k in zip(row, keep, strict=True) if int(k)]
                 for row, keep in zip(ids, mask, strict=True)]
    else:
        lists = [[int(t) for t in prompt] for prompt in prompts]
    if not lists:
        raise ValueError("generate() needs at least one prompt")
    empty = [i for i, p in enumerate(lists) if not p]
    if empty:
        raise ValueError(f"prompt {empty[0]} has no tokens: a completion needs something to condition on")
    return lists


def _lists(values: Any) -> Any:
    """Python lists from a tensor or array (a tokenizer's return_tensors), the value itself otherwise."""
    return values.tolist() if hasattr(values, "tolist") else values


class LocalRolloutEngine(RolloutEngine):
    """Samples in-process from the policy module the trainer updates: no weight copy, nothing to sync.

    `forward` picks how the model runs (see `posttrain.rollout.forward`): "auto" uses the fast
    Llama decoder when the model has Llama's layers (`forward.LLAMA_LIKE`: Llama, Qwen2, Mistral, Qwen3), else the
    model's own forward; "llama" / "hf" force one.
    `onednn=False` keeps the Llama decoder's linear layers on torch's own GEMM (see `rollout.gemm`).
    The sampling loop, stop handling and bookkeeping are the same for both.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, forward: str = "auto",
                 onednn: bool = True) -> None:
        if forward not in FORWARDS:
            raise ValueError(f"forward must be one of {', '.join(FORWARDS)}, got {forward!r}")
        self.model, self.tokenizer, self.forward, self.onednn = model, tokenizer, forward, onednn
        self.turn_ends = turn_end_ids(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
        self.pad_id: int = pad

    def update_weights(self, model: torch.nn.Module) -> None:
        """Nothing to copy: the engine samples from `model` itself (rebinding lets a caller swap modules)."""
        self.model = model

    def eos_token_ids(self) -> set[int]:
        """EOS ids of the tokenizer and of the model's generation config (which may list several), and the chat
        template's end-of-turn token (`data.tokenize.turn_end_ids`): what ends an answer in the training rows."""
        ids: set[int | None] = set(self.turn_ends)  # the tokenizer's EOS among them
        generation_config = getattr(self.model, "generation_config", None)
        configured = getattr(generation_config, "eos_token_id", None)
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
        return {int(i) for i in ids if i is not None}

    def generate(self, prompts: Prompts, params: SamplingParams,
                 generator: torch.Generator | None = None) -> Rollout:
        prompt_lists = prompt_token_lists(prompts)
        limit = position_limit(self.model)
        peft_config = prompt_learning(self.model)  # prefix-tuning's virtual tokens take positions
        virtual = peft_config.num_virtual_tokens if peft_config is not None else 0
        if limit is not None and virtual + max(map(len, prompt_lists)) + params.max_new_tokens > limit:
            # A learned position table (GPT-2, OPT) has no row past its end: an IndexError mid-generation otherwise.
            raise ConfigError(f"a prompt of {max(map(len, prompt_lists))} tokens and max_new_tokens="
                              f"{params.max_new_tokens} new ones" + (f" (after {virtual} virtual tokens)" if virtual
                                                                     else "")
                              + f" are longer than the {limit} positions this model has: make their sum <= "
                              f"{limit - virtual} (shorter prompts or fewer new tokens)")
        rows = torch.arange(len(prompt_lists)).repeat_interleave(params.n)
        params.check_prompt_seeds(len(prompt_lists))
        if params.prompt_seeds is not None:
            generator = row_generators(params.prompt_seeds, params.n)
        elif generator is None and params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)  # a CPU stream: the same draws on any device
        # Sample in eval mode (no dropout), then give every module back the mode it had.
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        try:
            with torch.inference_mode():
                tokens, logprobs, lengths, reasons = self._sample(prompt_lists, params, generator)
        finally:
            for module, training in modes:
                module.training = training
        # Rollouts live on the CPU, as the vLLM engine's do: the RL loop's bookkeeping (rewards, advantages,
        # schedules) runs there, and each forward moves what it takes to its model's device. Copied outside
        # inference mode: inference tensors cannot enter a later autograd forward.
        tokens, logprobs, lengths = (t.to("cpu", copy=True) for t in (tokens, logprobs, lengths))
        response_mask = (torch.arange(tokens.shape[1]) < lengths.unsqueeze(1)).long()
        prompt_ids, prompt_mask = left_pad([prompt_lists[r] for r in rows.tolist()], self.pad_id)
        texts = [self._text(row[:n].tolist(), reason, params.stop)
                 for row, n, reason in zip(tokens, lengths.tolist(), reasons, strict=True)]
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                       completion_ids=tokens.masked_fill(response_mask == 0, self.pad_id), response_mask=response_mask,
                       logprobs=logprobs.masked_fill(response_mask == 0, 0.0), finish_reasons=reasons, texts=texts,
                       prompt_index=rows, temperature=params.logprob_temperature)

    def _sample(self, prompts: list[list[int]], params: SamplingParams,
                generator: torch.Generator | list[torch.Generator] | None
                ) -> tuple[Tensor, Tensor, Tensor, list[FinishReason]]:
        """The decoding loop. Returns tokens, logprobs [B, T], lengths [B] (through the stop token), reasons."""
        decoder = make_decoder(self.forward, self.model, prompts, params.n, params.max_new_tokens, self.pad_id,
                               self.onednn)
        logits = decoder.prefill()
        batch, limit, device = len(prompts) * params.n, params.max_new_tokens, logits.device
        tokens = torch.full((batch, limit), self.pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros((batch, limit), dtype=torch.float32, device=device)
        lengths = torch.full((batch,), limit, dtype=torch.long, device=device)
        reasons: list[FinishReason] = ["length"] * batch
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        eos_ids = torch.tensor(sorted(self.eos_token_ids()), dtype=torch.long, device=device)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
        steps = limit
        for step in range(limit):
            new, new_logprobs = sample_next(logits, params, generator)
            tokens[:, step] = new.masked_fill(done, self.pad_id)
            logprobs[:, step] = new_logprobs
            hit_eos = torch.isin(new, eos_ids) & ~done
            hit_stop = torch.isin(new, stop_ids) & ~done & ~hit_eos
            if params.stop:
                hit_stop |= self._stop_string_hits(tokens, step, ~(done | hit_eos), params.stop)
            finished = hit_eos | hit_stop
            if finished.any():
                lengths[finished] = step + 1
                for b in hit_eos.nonzero().flatten().tolist():
                    reasons[b] = "eos"
                for b in hit_stop.nonzero().flatten().tolist():
                    reasons[b] = "stop"
                done |= finished
                if bool(done.all()):  # early exit: nobody is still generating
                    steps = step + 1
                    break
                decoder.release(done)
            if step + 1 < limit:
                logits = decoder.step(tokens[:, step])
        return tokens[:, :steps], logprobs[:, :steps], lengths, reasons

    def _stop_string_hits(self, tokens: Tensor, step: int, active: Tensor, stops: tuple[str, ...]) -> Tensor:
        """Rows whose completion text now contains a stop string, checked on a trailing token window.

        A stop string found now must end in the newest token (it was absent a step ago), so decoding
        the last few tokens suffices: every token decodes to at least one character, except special
        tokens and pieces of multi-byte characters, hence the generous window.
        """
        window = 4 * max(len(s) for s in stops) + 8
        candidates = active.nonzero().flatten().tolist()
        hits = torch.zeros_like(active)
        if not candidates:
            return hits
        recent = tokens[candidates, max(0, step + 1 - window): step + 1].tolist()
        texts = self.tokenizer.batch_decode(recent, skip_special_tokens=True)
        for b, text in zip(candidates, texts, strict=True):
            hits[b] = any(s in text for s in stops)
        return hits

    def _text(self, ids: list[int], reason: FinishReason, stops: tuple[str, ...]) -> str:
        """The completion text; a stop-string completion is cut right after its stop string."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        ends = [text.find(s) + len(s) for s in stops if s in text] if reason == "stop" else []
        return text[: min(ends)] if ends else text
