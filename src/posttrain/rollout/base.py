"""What every rollout engine takes and returns: `SamplingParams` in, a `Rollout` out.

The RL recipes only talk to the `RolloutEngine` interface, so the in-process engine that samples
with the policy's own weights and a vLLM server later are interchangeable.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

FinishReason = Literal["eos", "stop", "length"]

# A batch of prompts: token id lists (any lengths), or a tokenizer-style batch whose
# attention_mask marks the real tokens (left or right padded, either works).
Prompts = Sequence[Sequence[int]] | Mapping[str, Tensor]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample completions.

    Logprobs (`Rollout.logprobs`) are always those of the temperature-scaled full distribution,
    softmax(logits / temperature), before top-k / top-p truncation: that is what the trainer
    recomputes from the policy's logits, so sampler and trainer agree to rounding. With top-k or
    top-p the token is drawn from the truncated distribution, whose probabilities are larger by the
    kept mass; the ratio logp_new / logp_old of PPO-style losses is then the ratio of the full
    distributions, as in TRL and verl.
    """

    max_new_tokens: int = 64
    """Most tokens to generate per completion; a completion cut here finishes with "length"."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding (logprobs then under temperature 1)."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 = no top-k truncation."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens with probability >= top_p; 1 = off."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a completion ("stop"), besides the model's EOS ids ("eos"); kept in the mask."""
    stop: tuple[str, ...] = ()
    """Strings that end a completion ("stop") once the completion text contains one."""
    n: int = 1
    """Completions per prompt (a GRPO group); rows are prompt-major: prompt 0's n samples first."""
    seed: int | None = None
    """Seed of a fresh torch.Generator for this call: same seed, same prompts, same model -> same samples."""
    prompt_seeds: tuple[int, ...] | None = None
    """One seed per prompt, each drawing its prompt's n samples from streams of their own (before `seed` and a
    caller's generator): a prompt's samples are then the same whichever prompts share the call, so an evaluation
    scores the same samples at any batch size."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        # One string or id given alone is one stop, not its characters (a str is a sequence too).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if isinstance(self.stop_token_ids, int):
            object.__setattr__(self, "stop_token_ids", (self.stop_token_ids,))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        # Lists from YAML become tuples, so the params stay hashable and immutable.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.prompt_seeds is not None:
            object.__setattr__(self, "prompt_seeds", tuple(int(s) for s in self.prompt_seeds))

    def check_prompt_seeds(self, prompts: int) -> None:
        """`prompt_seeds`, if given, has one seed for each of the call's `prompts`."""
        if self.prompt_seeds is not None and len(self.prompt_seeds) != prompts:
            raise ValueError(f"prompt_seeds has {len(self.prompt_seeds)} seeds for {prompts} prompts")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """The temperature the reported logprobs are under (greedy decoding reports temperature 1)."""
        return 1.0 if self.greedy else self.temperature


@dataclass(frozen=True)
class Rollout:
    """A batch of sampled completions with the bookkeeping the RL losses need.

    Layout: `prompt_ids` is left-padded and `completion_ids` right-padded, so
    `input_ids = [prompt_ids | completion_ids]` has every prompt ending at the same column and
    every completion starting at the next one. Rows are prompt-major (`prompt_index`).

    Shapes: prompt_ids, prompt_mask [B, P]; completion_ids, response_mask, logprobs [B, T], where
    T is the longest completion (generation exits early once every row has finished).
    `response_mask` is 1 on generated tokens up to and including the EOS / stop token and 0 after;
    `logprobs` are the sampler's, under `temperature` (see `SamplingParams`), 0 where the mask is 0.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    response_mask: Tensor
    logprobs: Tensor
    finish_reasons: list[FinishReason]
    texts: list[str]
    """Decoded completions (special tokens skipped); a stop-string completion ends at the stop string,
    although its last token (kept in `completion_ids`) may carry a few characters beyond it."""
    prompt_index: Tensor
    """[B]: the index, in the `prompts` given to `generate`, of the prompt each row completes."""
    temperature: float
    """The temperature `logprobs` are under; recompute the policy's logprobs with the same one."""

    @property
    def input_ids(self) -> Tensor:
        """[B, P + T] prompt and completion side by side."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """[B, P + T] 1 on real prompt tokens and on completion tokens inside `response_mask`."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def position_ids(self) -> Tensor:
        """[B, P + T] positions counted from each row's first real token (as during sampling)."""
        return position_ids_from_mask(self.attention_mask)

    @property
    def completion_lengths(self) -> Tensor:
        """[B] number of tokens in each completion's mask."""
        return self.response_mask.sum(dim=1)

    def select(self, rows: Tensor | Sequence[int]) -> Rollout:
        """The rollout of `rows` (in that order), trimmed to their own longest prompt and completion.

        Trimming keeps the layout (prompts end at one column, completions start at the next) and the
        positions (counted from each row's first real token), so logprobs recomputed on a selection
        equal those of the full batch; a micro-batch of short rows then pays for short rows only.
        """
        index = torch.as_tensor(rows, dtype=torch.long, device=self.prompt_ids.device)
        prompt_mask, response_mask = self.prompt_mask[index], self.response_mask[index]
        start = self.prompt_ids.shape[1] - int(prompt_mask.sum(dim=1).max())
        width = int(response_mask.sum(dim=1).max())
        picked = index.tolist()
        return Rollout(prompt_ids=self.prompt_ids[index, start:], prompt_mask=prompt_mask[:, start:],
                       completion_ids=self.completion_ids[index, :width], response_mask=response_mask[:, :width],
                       logprobs=self.logprobs[index, :width], finish_reasons=[self.finish_reasons[i] for i in picked],
                       texts=[self.texts[i] for i in picked], prompt_index=self.prompt_index[index],
                       temperature=self.temperature)

    @property
    def truncated(self) -> Tensor:
        """[B] bool: completions cut by max_new_tokens (a recipe may mask them out of the loss)."""
        return torch.tensor([r == "length" for r in self.finish_reasons], dtype=torch.bool,
                            device=self.response_mask.device)


def concat_rollouts(rollouts: Sequence[Rollout]) -> Rollout:
    """One rollout of several (sampled at the same temperature), rows in order: prompts left-padded and
    completions right-padded to the widest, prompt indices counted on (the prompts of the second rollout follow
    those of the first), so row by row it holds exactly what each part held."""
    if len({r.temperature for r in rollouts}) != 1:
        raise ValueError("rollouts sampled at different temperatures cannot be joined")
    prompt_width = max(r.prompt_ids.shape[1] for r in rollouts)
    width = max(r.completion_ids.shape[1] for r in rollouts)

    def left(tensor: Tensor) -> Tensor:
        return torch.nn.functional.pad(tensor, (prompt_width - tensor.shape[1], 0))

    def right(tensor: Tensor) -> Tensor:
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]))

    offsets, prompt_index = 0, []
    for r in rollouts:
        prompt_index.append(r.prompt_index + offsets)
        offsets += int(r.prompt_index.max()) + 1 if len(r.prompt_index) else 0
    return Rollout(prompt_ids=torch.cat([left(r.prompt_ids) for r in rollouts]),
                   prompt_mask=torch.cat([left(r.prompt_mask) for r in rollouts]),
                   completion_ids=torch.cat([right(r.completion_ids) for r in rollouts]),
                   response_mask=torch.cat([right(r.response_mask) for r in rollouts]),
                   logprobs=torch.cat([right(r.logprobs) for r in rollouts]),
                   finish_reasons=[f for r in rollouts for f in r.finish_reasons],
                   texts=[t for r in rollouts for t in r.texts], prompt_index=torch.cat(prompt_index),
                   temperature=rollouts[0].temperature)


def text_rollout(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[str]], tokenizer: Any,
                 temperature: float = 1.0) -> Rollout:
    """A Rollout of given completion texts: completions[i] are the texts of prompt i (token ids), each encoded
    without special tokens and ended with EOS, rows prompt-major as an engine returns them. Sampler logprobs
    are 0 (nothing sampled them): completions written or sampled elsewhere, scored and trained on like a
    round's samples."""
    rows = [(list(prompt), i, tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
             text) for i, (prompt, texts) in enumerate(zip(prompts, completions, strict=True)) for text in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_width, width = max(len(r[0]) for r in rows), max(len(r[2]) for r in rows)
    prompt_ids = torch.full((len(rows), prompt_width), pad)
    prompt_mask = torch.zeros(len(rows), prompt_width, dtype=torch.long)
    completion_ids = torch.full((len(rows), width), pad)
    response_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for row, (prompt, _, ids, _) in enumerate(rows):
        prompt_ids[row, prompt_width - len(prompt):], prompt_mask[row, prompt_width - len(prompt):] = (
            torch.tensor(prompt), 1)
        completion_ids[row, :len(ids)], response_mask[row, :len(ids)] = torch.tensor(ids), 1
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   response_mask=response_mask, logprobs=torch.zeros(len(rows), width, dtype=torch.float32),
                   finish_reasons=["eos"] * len(rows), texts=[r[3] for r in rows],
                   prompt_index=torch.tensor([r[1] for r in rows]), temperature=temperature)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that count from each row's first real token: cumsum(mask) - 1, clamped at 0.

    Sampling and the trainer's recompute must use the same positions, or RoPE rotates left-padded
    rows differently and the two logprobs disagree. Padding before the first real token gets 0,
    padding after the last one repeats the last position: both are masked out of attention.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


class RolloutEngine(abc.ABC):
    """Samples completions for a batch of prompts. Implementations: `LocalRolloutEngine` (in-process)."""

    @abc.abstractmethod
    def generate(self, prompts: Prompts, params: SamplingParams,
                 generator: torch.Generator | None = None) -> Rollout:
        """Sample `params.n` completions per prompt. `generator` (or else `params.seed`) makes it reproducible."""

    @abc.abstractmethod
    def update_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights (an engine holding a copy must sync it)."""
