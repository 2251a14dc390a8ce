"""Scorers backed by trained reward models: the interface PPO, rejection sampling, graders and GRPO
process supervision call, whatever produced the model.

Completions are rendered exactly as the reward model saw its training rows (the chat template and thinking
switch its `posttrain rm` run saved with it, through `posttrain.data.tokenize.Encoder`), as long as its positions
allow (a prompt longer than that cut from the left), and scored without gradients in
micro-batches of `batch_size` sequences, padding-free: each micro-batch's sequences packed into rows of
at most `capacity` tokens (block mask), so no position of a forward is padding, and the completions of one prompt
after one copy of it (`data.collate.collate_shared_prompts`; `score_tokens` without a response mask does not know
where a prompt ends and lays each sequence out whole). Token batches that a policy
generated (prompt + completion ids from the same tokenizer) can be scored directly with `score_tokens`:
no decode and re-encode round trip.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from posttrain.data.collate import PackingOptions, collate_sequences, collate_stepwise
from posttrain.data.config import DataConfig
from posttrain.data.schemas import message, tools_json
from posttrain.data.tokenize import Encoder, RowProblem, encode_stepwise
from posttrain.errors import ConfigError, DataError
from posttrain.models import load_tokenizer
from posttrain.models.attention import packing_obstacle, position_limit
from posttrain.models.heads import floating_dtype
from posttrain.models.io import check_model_dir, check_tokenizer_fits
from posttrain.models.reward import is_likelihood_model, load_reward_model, scores_at, sequence_scores

Prompt = str | Sequence[dict[str, Any]]


# What a scorer renders up to where the reward model's positions have no table to run out of (rotary ones).
UNLIMITED_LENGTH = 1 << 30


def rendering_settings(data: DataConfig) -> dict[str, str]:
    """The data settings that decide how a reward model's rows were rendered, saved with it (`reward_rendering` in
    its config) so that the scorers render completions the same way."""
    return {"template": data.template, "thinking": data.thinking}


def scoring_config(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None = None) -> DataConfig:
    """How a scorer renders for `model`: its saved `reward_rendering` (for a model saved without it, the chat
    template, or plain text where its `tokenizer` has none: a reward model trained elsewhere on plain text), as long
    as its positions allow, a too-long prompt cut from the left."""
    saved = getattr(model.config, "reward_rendering", None) or {}
    template = saved.get("template") or ("plain" if tokenizer is not None and not tokenizer.chat_template else "chat")
    return DataConfig(truncation="truncate_left", max_length=position_limit(model) or UNLIMITED_LENGTH,
                      template=template, thinking=saved.get("thinking", "on"))


def _messages(prompt: Prompt) -> list[dict[str, Any]]:
    """Canonical messages of a prompt as text or as messages, tool calls and tool results included (as JSON text,
    the form rows keep them in)."""
    if isinstance(prompt, str):
        return [message("user", prompt)]
    return [message(m["role"], m["content"], m.get("reasoning"), tool_calls=_json_text(m.get("tool_calls")),
                    name=m.get("name"), tool_call_id=m.get("tool_call_id")) for m in prompt]


def _json_text(value: Any) -> str | None:
    return value if value is None or isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class _Scorer:
    """A reward model, its tokenizer and the rendering settings of its training data."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: DataConfig | None = None,
                 batch_size: int = 32, capacity: int = 256) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.encoder = Encoder.from_config(tokenizer, data or scoring_config(model, tokenizer))
        self.batch_size, self.capacity = batch_size, capacity
        self.pad_token_id = tokenizer.pad_token_id
        self.packs = packing_obstacle(model) is None

    @classmethod
    def from_pretrained(cls, path: str | Path, data: DataConfig | None = None, batch_size: int = 32,
                        device: torch.device | str | None = None, dtype: str = "auto",
                        field: str = "reward.model_path"):
        """Load a reward model saved by `posttrain rm` (either head); `data`: render as these settings say instead
        of as the model was trained; `field` the setting that named `path` (in the one-line errors). A scorer's
        model never runs code of its own (model.trust_remote_code is the policy's)."""
        check_model_dir(path, field, trust_hint=False)
        model, tokenizer = load_reward_model(path, dtype=dtype, device=device, field=field), load_tokenizer(path)
        check_tokenizer_fits(tokenizer, model, field)
        return cls(model, tokenizer, data, batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompt: Prompt, completion: str, tools: Any = None) -> tuple[list[int], list[int]]:
        """The token ids of (prompt, completion) as the training rows were rendered (with the row's `tools`, as
        given or as JSON text), and the completion's mask; RowProblem where the template cannot render them."""
        turn = {"role": "assistant", "content": completion, "reasoning": None}
        messages = _messages(prompt)
        encoder = self.encoder.for_row({"tools": tools_json(tools)})
        ids, mask = encoder.encode([*messages, turn], prompt_turns=len(messages))
        excess = len(ids) - encoder.max_length
        return encoder.fit(ids, mask, excess) if excess > 0 else (ids, mask)

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    def _sequence_scores(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Tensor:
        """The reward [N] of each (token ids, completion mask) sequence, read at its last token (a likelihood
        model: summed over the masked tokens): `batch_size` sequences a forward, packed into rows of at most
        `capacity` tokens (or the longest sequence's), each prompt once for the sequences that open with it (its
        tokens before the first masked one); padded rows for a model that cannot take packed ones
        (ALiBi's Bloom and MPT, which count positions along the mask: `packing_obstacle`)."""
        packing = PackingOptions(mask_dtype=floating_dtype(self.model), row_capacity=self.capacity,
                                 share_prompts=True) if self.packs else None
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
        """Rewards [N] of the completions (text, with any <think> block inline) of their prompts; a DataError if
        one cannot be scored (see `score_rows`)."""
        values, errors = self.score_rows(prompts, completions)
        first = next((i for i, e in enumerate(errors) if e is not None), None)
        if first is not None:
            raise DataError(f"completion {first}: {errors[first]}", field="completions")
        return values

    __call__ = score

    @torch.no_grad()
    def score_rows(self, prompts: Sequence[Prompt], completions: Sequence[str],
                   tools: Sequence[Any] | None = None) -> tuple[Tensor, list[str | None]]:
        """Rewards [N], and for each row None or why it has no reward (NaN there): a completion the reward model's
        rows could not hold, such as special-token text a policy spelled out of ordinary tokens. One such row
        leaves the others scored. `tools`: each row's function schemas (its prompt was rendered with them)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        encoded, errors = [], []
        for prompt, completion, row_tools in zip(prompts, completions, tools or [None] * len(prompts), strict=True):
            try:
                encoded.append(self.encode(prompt, completion, row_tools))
                errors.append(None)
            except RowProblem as problem:
                errors.append(f"the reward model cannot score it: {problem}")
        values = torch.full((len(completions),), float("nan"))
        values[[i for i, e in enumerate(errors) if e is None]] = self._sequence_scores(encoded)
        return values, errors

    @torch.no_grad()
    def score_tokens(self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor | None = None) -> Tensor:
        """Rewards [B] of token batches (prompt + completion ids, left or right padded, attended tokens
        contiguous), padding-free like `score`. Each completion is ended as the training rows' answers were: its
        end-of-turn token (a completion cut off before it gets it) and whatever the template writes after the
        turn (ChatML's newline), since that is where a reward head learned to read. `response_mask` (1 on the
        completion's tokens) is needed by a likelihood reward model, which scores the completion alone."""
        if response_mask is None:
            if is_likelihood_model(self.model):
                raise ValueError("a likelihood reward model scores the completion's tokens: pass response_mask")
            response_mask = torch.zeros_like(attention_mask)
        (closer, closer_mark), tail = self._turn_ending
        closers = self.encoder.closers
        sequences = []
        for ids, marks, keep in zip(input_ids, response_mask, attention_mask.bool(), strict=True):
            ids, marks = ids[keep].tolist(), marks[keep].tolist()
            ending = tail if ids and ids[-1] in closers else [(closer, closer_mark), *tail]
            ids, marks = ids + [t for t, _ in ending], marks + [m for _, m in ending]
            excess = len(ids) - self.encoder.max_length  # a table of learned positions (GPT-2) holds no more
            sequences.append(self.encoder.fit(ids, marks, excess) if excess > 0 else (ids, marks))
        return self._sequence_scores(sequences)

    @functools.cached_property
    def _turn_ending(self) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        """The token that ends an answer in the training rows, and the tokens the template writes after it, each
        with its response-mask mark there (a likelihood model sums over the marked ones): `Encoder.answer_ending`.
        Phi-3's turn ends `<|end|>`, newline, `<|endoftext|>`: a completion that stopped at `<|end|>` gets the other
        two, as its training rows had them."""
        closer, *tail = self.encoder.answer_ending
        return closer, tail


class ProcessRewardScorer(_Scorer):
    """One score per reasoning step, from a model trained by `posttrain rm prm`.

    A classifier's scores are probabilities that the step is correct (sigmoid of the head); a
    regressor's are its raw step values. Steps are rendered one per line, as in training.

        scorer = ProcessRewardScorer.from_pretrained("runs/prm/final")
        scorer.score_steps(["Start with 7. Add 5. ..."], [["7+5=12", "12*3=36"]])   # [[p1, p2]]
    """

    @classmethod
    def from_pretrained(cls, path: str | Path, data: DataConfig | None = None, batch_size: int = 32,
                        device: torch.device | str | None = None, dtype: str = "auto",
                        field: str = "advantage.prm_path"):
        """As `_Scorer.from_pretrained`; an outcome reward model saved by `posttrain rm` (its rendering recorded, no
        `process_target`) is refused: its one score per response read at each step's end is no step's probability."""
        scorer = super().from_pretrained(path, data, batch_size, device, dtype, field)
        config = scorer.model.config
        if getattr(config, "reward_rendering", None) is not None and getattr(config, "process_target", None) is None:
            raise ConfigError(f"{path} is an outcome reward model (one score per response), not a process reward "
                              "model: train one with `posttrain rm prm` (kind=process)", field=field)
        return scorer

    @property
    def target(self) -> str:
        return getattr(self.model.config, "process_target", "classification")

    @torch.no_grad()
    def score_steps(self, prompts: Sequence[Prompt], steps: Sequence[Sequence[str]]) -> list[list[float | None]]:
        """Per-step scores of each solution (a list of step texts) of its prompt. None for a step that has no
        score: one whose separator a solution longer than the model's positions allow had to lose (the solution
        is cut from the left), or every step of a solution that cannot be rendered as the training rows were."""
        if len(prompts) != len(steps):
            raise ValueError(f"{len(prompts)} prompts for {len(steps)} step lists")
        rows, ends_of = [], []
        for prompt, chain in zip(prompts, steps, strict=True):
            try:
                ids, ends = encode_stepwise(self.encoder, _messages(prompt), list(chain), cut_steps=True)
            except DataError:
                ends_of.append([None] * len(chain))
                continue
            ends_of.append(ends)
            kept = [e for e in ends if e is not None]
            if kept:
                rows.append({"input_ids": ids, "response_mask": [0] * len(ids), "step_ends": kept,
                             "step_labels": [0.0] * len(kept)})
        values: list[float] = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i:i + self.batch_size]
            batch = self._to_device(collate_stepwise(chunk, self.pad_token_id))
            scores = scores_at(self.model, batch, batch["step_ends"]).float()
            scores = scores.sigmoid() if self.target == "classification" else scores
            values += [v for row, r in zip(scores.cpu().tolist(), chunk, strict=True)
                       for v in row[:len(r["step_ends"])]]
        found = iter(values)
        return [[None if end is None else next(found) for end in ends] for ends in ends_of]

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[list[float | None]]:
        """Per-step scores of completions whose steps are their non-empty lines (None as in `score_steps`)."""
        return self.score_steps(prompts, [[line for line in c.splitlines() if line.strip()] for c in completions])

    __call__ = score
