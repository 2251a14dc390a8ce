"""Step scorers for process supervision: a score for every reasoning step of a completion, and where
in the completion the step ends.

    verifier  the task's own step checker (the built-in `multistep` task: a step line is right when it
              computes correctly and reaches the gold value of that step)
    prm       a process reward model trained by `posttrain rm prm`, read at each line's end

A scorer returns, per completion, a list of `Step(score, char_end)`; `locate_steps` turns the
character positions into token positions of the generated ids, which is what
`algos.process_advantages` needs (the advantage of token t sums the rewards of the steps ending at
or after t).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from transformers import PreTrainedTokenizerBase

from posttrain.data.tasks.base import Task
from posttrain.rewards.functions import Completions


@dataclasses.dataclass(frozen=True)
class Step:
    """One scored step: its reward, the index of its last character in the completion text and, where the scorer
    reads it (a labelled line, "b)" or "Step 2:"), which step of the solution it is (from 0; None: its place)."""

    score: float
    char_end: int
    position: int | None = None


StepScorer = Callable[[Completions], list[list[Step]]]


def verifier_step_scorer(task: Task) -> StepScorer:
    """Score every step line the task finds in a completion with the task's step verifier.

    A line scores 1 when it computes correctly and its value is the gold value of its step (its label's, else
    its place), else 0; lines past the last gold step, and lines repeating a step, score 0. Missing steps have no
    position, so they get no reward here: the outcome reward (counted as a final step by the recipe) is what
    penalises stopping early.
    """
    line_scores = getattr(task, "step_line_scores", None)
    if line_scores is None:
        raise ValueError(f"task {task.name!r} has no step verifier (step_line_scores); "
                         "score steps with a process reward model instead")

    def score(batch: Completions) -> list[list[Step]]:  # (score, end) or (score, end, which step) of each line
        return [[Step(*line) for line in line_scores(completion, gold)]
                for completion, gold in zip(batch.completions, batch.steps, strict=True)]

    return score


def line_ends(text: str) -> list[tuple[str, int]]:
    """(line, index of its newline — or of its last character at the end of the text) of every
    non-empty line: the steps of a solution written one per line, as process reward models read them."""
    out, start = [], 0
    for line in text.split("\n"):
        end = start + len(line)
        if line.strip():
            out.append((line, end if end < len(text) else end - 1))
        start = end + 1
    return out


def prm_step_scorer(scorer) -> StepScorer:
    """Score each non-empty line with a `ProcessRewardScorer` (the probability that the step is right
    for a classifier, the step value for a regressor). A line the model could not score (see
    `ProcessRewardScorer.score_steps`) is no step, as a missing step is for the verifier."""

    def score(batch: Completions) -> list[list[Step]]:
        lines = [line_ends(c) for c in batch.completions]
        rows = [i for i, found in enumerate(lines) if found]  # a completion without a line has no step
        values = scorer.score_steps([batch.prompts[i] for i in rows], [[t for t, _ in lines[i]] for i in rows])
        out: list[list[Step]] = [[] for _ in lines]
        for i, row_scores in zip(rows, values, strict=True):
            out[i] = [Step(s, end) for s, (_, end) in zip(row_scores, lines[i], strict=True) if s is not None]
        return out

    return score


def locate_steps(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], char_ends: Sequence[int]) -> list[int]:
    """The index of the generated token that holds each character position of the decoded text.

    Token t holds character c when decode(ids[:t]) is at most c characters long and decode(ids[:t + 1])
    is longer (decoding as the rollout's texts are decoded, special tokens skipped). Found by
    bisection: a few decodes per step instead of one per token. A position past the text maps to
    the last token.

    A prefix that ends inside a character split over several tokens (byte-fallback or byte-level
    tokens of a non-ASCII character) decodes to replacement characters, one per byte for a
    byte-fallback decoder: those are not characters of the text yet, so they are not counted (else
    a step ending just after "日" was placed on the character's second byte).
    """
    ids = list(ids)

    def decoded_length(count: int) -> int:
        return len(tokenizer.decode(ids[:count], skip_special_tokens=True).rstrip("\ufffd"))

    out = []
    for char in char_ends:
        low, high = 0, len(ids) - 1  # the answer lies in [low, high]
        while low < high:
            middle = (low + high) // 2
            if decoded_length(middle + 1) > char:
                high = middle
            else:
                low = middle + 1
        out.append(low)
    return out
