"""Scorers backed by trained reward models: the interface PPO, rejection sampling, graders and GRPO
process supervision call, whatever produced the model.

Completions are rendered exactly as the reward model saw its training rows (the same chat template
and thinking switch, through `posttrain.data.tokenize.Encoder`) and scored without gradients in
micro-batches of `batch_size` sequences, padding-free: each micro-batch's sequences packed into rows of
at most `capacity` tokens (block-diagonal mask), so no position of a forward is padding. Token batches that a policy
generated (prompt + completion ids from the same tokenizer) can be scored directly with `score_tokens`:
no decode and re-encode round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from posttrain.data.collate import PackingOptions, collate_sequences, collate_stepwise
from posttrain.data.config import DataConfig
from posttrain.data.schemas import message
from posttrain.data.tokenize import Encoder, encode_stepwise
from posttrain.models import load_tokenizer
from posttrain.models.heads import floating_dtype
from posttrain.models.reward import is_likelihood_model, load_reward_model, scores_at, sequence_scores

Prompt = str | Sequence[dict[str, Any]]


def _messages(prompt: Prompt) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [message("user", prompt)]
    return [message(m["role"], m["content"], m.get("reasoning")) for m in prompt]


class _Scorer:
    """A reward model, its tokenizer and the rendering settings of its training data."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: DataConfig | None = None,
                 batch_size: int = 32, capacity: int = 256) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.encoder = Encoder.from_config(tokenizer, data or DataConfig(truncation="truncate_left"))
        self.batch_size, self.capacity = batch_size, capacity
        self.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def from_pretrained(cls, path: str | Path, data: DataConfig | None = None, batch_size: int = 32,
                        device: torch.device | str | None = None, dtype: str = "auto"):
        """Load a reward model saved by `posttrain rm` (either head)."""
        return cls(load_reward_model(path, dtype=dtype, device=device), load_tokenizer(path), data, batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _encode(self, prompt: Prompt, completion: str) -> tuple[list[int], list[int]]:
        """The token ids of (prompt, completion) as the training rows were rendered, and the completion's mask."""
        turn = {"role": "assistant", "content": completion, "reasoning": None}
        messages = _messages(prompt)
        ids, mask = self.encoder.encode([*messages, turn], prompt_turns=len(messages))
        excess = len(ids) - self.encoder.max_length
        return self.encoder.fit(ids, mask, excess) if excess > 0 else (ids, mask)

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    def _sequence_scores(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Tensor:
        """The reward [N] of each (token ids, completion mask) sequence, read at its last token (a likelihood
        model: summed over the masked tokens): `batch_size` sequences a forward, packed into rows of at most
        `capacity` tokens (or the longest sequence's)."""
        packing = PackingOptions(mask_dtype=floating_dtype(self.model), row_capacity=self.capacity)
        out = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = [{"input_ids": list(ids), "response_mask": list(mask)}
                     for ids, mask in sequences[start:start + self.batch_size]]
            batch = collate_sequences(chunk, self.pad_token_id, packing)
            out.append(sequence_scores(self.model, self._to_device(batch)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


class RewardModelScorer(_Scorer):
    """One scalar reward per (prompt, completion), from a model trained by `posttrain rm`.

        scorer = RewardModelScorer.from_pretrained("runs/rm/final")
        scorer.score(["What is 2+3?"], ["5"])          # tensor([r])
    """

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> Tensor:
        """Rewards [N] of the completions (text, with any <think> block inline) of their prompts."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        return self._sequence_scores([self._encode(p, c) for p, c in zip(prompts, completions, strict=True)])

    __call__ = score

    @torch.no_grad()
    def score_tokens(self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor | None = None) -> Tensor:
        """Rewards [B] of token batches (prompt + completion ids, left or right padded, attended tokens
        contiguous), read at each row's last attended token; padding-free like `score`. `response_mask` (1 on
        the completion's tokens) is needed by a likelihood reward model, which scores the completion alone."""
        if response_mask is None:
            if is_likelihood_model(self.model):
                raise ValueError("a likelihood reward model scores the completion's tokens: pass response_mask")
            response_mask = torch.zeros_like(attention_mask)
        real = attention_mask.bool()
        return self._sequence_scores([(ids[keep].tolist(), marks[keep].tolist())
                                      for ids, marks, keep in zip(input_ids, response_mask, real, strict=True)])


class ProcessRewardScorer(_Scorer):
    """One score per reasoning step, from a model trained by `posttrain rm kind=process`.

    A classifier's scores are probabilities that the step is correct (sigmoid of the head); a
    regressor's are its raw step values. Steps are rendered one per line, as in training.

        scorer = ProcessRewardScorer.from_pretrained("runs/prm/final")
        scorer.score_steps(["Start with 7. Add 5. ..."], [["7+5=12", "12*3=36"]])   # [[p1, p2]]
    """

    @property
    def target(self) -> str:
        return getattr(self.model.config, "process_target", "classification")

    @torch.no_grad()
    def score_steps(self, prompts: Sequence[Prompt], steps: Sequence[Sequence[str]]) -> list[list[float]]:
        """Per-step scores of each solution (a list of step texts) of its prompt."""
        if len(prompts) != len(steps):
            raise ValueError(f"{len(prompts)} prompts for {len(steps)} step lists")
        rows = []
        for prompt, chain in zip(prompts, steps, strict=True):
            ids, ends = encode_stepwise(self.encoder, _messages(prompt), list(chain))
            rows.append({"input_ids": ids, "response_mask": [0] * len(ids), "step_ends": ends,
                         "step_labels": [0.0] * len(ends)})
        scores: list[list[float]] = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i:i + self.batch_size]
            batch = self._to_device(collate_stepwise(chunk, self.pad_token_id))
            values = scores_at(self.model, batch, batch["step_ends"]).float()
            values = values.sigmoid() if self.target == "classification" else values
            scores += [row[:len(r["step_ends"])] for row, r in zip(values.cpu().tolist(), chunk, strict=True)]
        return scores

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[list[float]]:
        """Per-step scores of completions whose steps are their non-empty lines."""
        return self.score_steps(prompts, [[line for line in c.splitlines() if line.strip()] for c in completions])

    __call__ = score
