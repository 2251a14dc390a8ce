"""`multistep`: a chain of 2-5 operations, solved one step per line, with a verifier for every step.

    prompt:      Start with 7. Apply in order:
                 a) x+5
                 b) x*3
                 c) x-4
                 What is the result?
    completion:  a) 7+5=12
                 b) 12*3=36
                 c) 36-4=32
                 Answer: 32

The format makes the next operation easy to find: the step line starts with the label of its operation,
and the prompt writes each operation as the step line does (`x*3`, `12*3`, with the same tokens), so the
model copies what follows the label it just wrote (an induction lookup) instead of counting instructions.
No operation occurs twice in a chain, so the lookup is never ambiguous. Measured with the demo's
pretrained model (AMD EPYC Zen5, SFT lr 2e-3, batch 64): 56% of steps right after 200 steps, 92% after
400; the earlier wording ("Add 5. Multiply by 3.", unlabelled lines) had 19% after 400 steps, nine in ten
first mistakes being the wrong operation, not wrong arithmetic.

The per-step gold values (12, 36, 32) come with every RL row (`steps`), and stepwise-supervision
rows for process reward models carry deliberately wrong steps: one step is off by a small amount
and the later steps compute correctly from the wrong value, so every step from the mistake on is
labelled wrong (a step is right only if it can still lead to the right answer, as in Math-Shepherd).
"""

from __future__ import annotations

import random
import re
from typing import NamedTuple

from posttrain.data.tasks.base import (
    NOT_STATED,
    WHOLE_INTEGER,
    Example,
    Task,
    answer_text,
    canonical_integer,
    integer_value,
    is_heldout_key,
    stated_answer,
)

MIN_STEPS, MAX_STEPS = 2, 5  # 3-8 steps: 54% of steps right after 400 SFT steps at 301 s, against 92% at 195 s
LABELS = "abcde"  # of the steps, in order
MAX_VALUE = 999  # multiplication is only offered while the result stays below this
DELTAS = (-10, -2, -1, 1, 2, 10)
# A step line: an optional label ("b)" as the task writes it; "B)", "2)", "2.", "Step 2:"; a bullet), then a∘b=value
# with ∘ written as people write it (× · x for *, U+2212 for -), then an optional full stop; a CRLF line's \r is
# trailing space too. A bullet is followed by a space: "-3*2=-6" starts with -3.
STEP_PATTERN = re.compile(
    r"^[ \t]*(?:(?:(?P<label>[a-z]|\d{1,2})[).:]|step[ \t]*(?P<number>\d{1,2})[ \t]*[:.)]?|[-*\u2022](?=[ \t]))[ \t]*)?"
    rf"(?P<a>{WHOLE_INTEGER})[ \t]*(?P<op>[-+*\u00d7\u00b7x\u2212])[ \t]*(?P<b>{WHOLE_INTEGER})"
    rf"[ \t]*=[ \t]*(?P<value>{WHOLE_INTEGER})[ \t]*\.?[ \t\r]*$", re.MULTILINE | re.IGNORECASE)
_OPERATORS = {"\u00d7": "*", "\u00b7": "*", "x": "*", "\u2212": "-"}
_KEY_OP = re.compile(r"([+\-*])(\d+)")

Chain = tuple[int, tuple[tuple[str, int], ...]]


class MultistepTask(Task):
    """Chains of `min_steps` to `max_steps` operations (each length equally likely). `multistep` draws 2-5;
    `multistep-long` 4-5, where a chain's final answer is mostly wrong before RL and a group's outcome rewards
    carry little signal: the comparison of process and outcome supervision lives there (README)."""

    formats = ("completion", "messages", "preference", "ranking", "verifiable", "stepwise", "unpaired")

    def __init__(self, name: str = "multistep", min_steps: int = MIN_STEPS, max_steps: int = MAX_STEPS) -> None:
        if not 1 <= min_steps <= max_steps <= len(LABELS):
            raise ValueError(f"a chain has 1 to {len(LABELS)} steps, got {min_steps}-{max_steps}")
        self.name, self.min_steps, self.max_steps = name, min_steps, max_steps
        self.description = (f"chains of {min_steps}-{max_steps} operations written one labelled step per line; every "
                            "step is verifiable")

    def example(self, rng: random.Random, split: str = "train") -> Example:
        while True:
            chain = _draw_chain(rng, self.min_steps, self.max_steps)
            key = _key(chain)
            if is_heldout_key(key) == (split == "heldout"):
                break
        start, ops = chain
        lines, values = _work(start, ops)
        prompt = _prompt(start, ops)
        return Example(key=key, prompt=prompt, answer=str(values[-1]), completion=_write(lines, values[-1]),
                       wrong=_wrong_completions(chain), separator="\n", steps=tuple(map(str, values)))

    def row(self, example: Example, fmt: str, rng: random.Random) -> dict:
        if fmt != "stepwise":
            return super().row(example, fmt, rng)
        start, ops = _parse_key(example.key)
        if rng.random() < 0.5:
            lines, _ = _work(start, ops)
            labels = [True] * len(lines)
        else:
            at = rng.randrange(len(ops))
            lines, _ = _work(start, ops, mistake=(at, rng.choice(DELTAS)))
            labels = [i < at for i in range(len(lines))]
        return {"prompt": example.prompt, "completions": lines, "labels": labels}

    def category(self, example: Example) -> str:
        """The chain's length: each step is one more chance to go wrong."""
        return f"{len(_parse_key(example.key)[1])} steps"

    def extract_answer(self, completion: str) -> str | None:
        """The last stated answer ("Answer: 35", "The final answer is 35", `base.stated_answer`), else the last
        step's value."""
        text = answer_text(completion)
        if text is None:
            return None
        # The last stated answer is the answer, whatever the steps say ("Answer: **35**" is no 36 of the last step;
        # "Answer: none" is none).
        stated = stated_answer(text)
        if stated is not NOT_STATED:
            return stated
        steps = parse_steps(text)
        return str(steps[-1].value) if steps else None

    def verify_steps(self, completion: str, steps: list[str]) -> list[float]:
        """A score per gold step: 1.0 when the completion's line for step j (the first labelled j, or j-th of the
        lines, `parse_steps`) computes correctly and its value is the gold value of step j, else 0.0 (missing
        steps score 0)."""
        scores, lines = [0.0] * len(steps), parse_steps(completion)
        for line, score in zip(lines, _line_scores(lines, steps), strict=True):
            if score:  # a right line is one of a gold step
                scores[line.step] = 1.0
        return scores

    def step_line_scores(self, completion: str, steps: list[str]) -> list[tuple[float, int, int]]:
        """(score, end, step) of every step line of the completion, in order: 1.0 when it is the first line for
        its step (`verify_steps`) and right, else 0.0 (a line past the last gold step, or one repeating a step: a
        process reward must not pay for writing a right step twice); `end` as `step_char_ends`; `step` which step
        the line is (`StepLine.step`: its label's, else its place), what step_baseline=position compares."""
        lines = parse_steps(completion)
        return [(score, line.end, line.step) for line, score in zip(lines, _line_scores(lines, steps), strict=True)]

    def step_char_ends(self, completion: str) -> list[int]:
        """The index of the last character of each step line (its newline when it has one): where a
        process reward model reads the score of that step."""
        return [line.end for line in parse_steps(completion)]


class StepLine(NamedTuple):
    a: int
    op: str
    b: int
    value: int
    end: int
    """The index in the completion of the line's newline, or of its last character at the end of the text."""
    step: int
    """Which step the line is: its label's ("b)" and "2." are step 1) where it is one of LABELS' (or 1-5), else its
    place among the step lines."""


def parse_steps(completion: str) -> list[StepLine]:
    """Every `a∘b=value` line after the thinking block (`STEP_PATTERN`), in order."""
    text = answer_text(completion)
    if text is None:
        return []
    offset = len(completion) - len(text)
    steps = []
    for place, match in enumerate(STEP_PATTERN.finditer(text)):
        end = match.end()
        end = end if end < len(text) and text[end] == "\n" else end - 1
        label, number = match["label"], match["number"]
        labelled = (int(number) - 1 if number else int(label) - 1 if label and label.isdigit()
                    else ord(label.lower()) - ord("a") if label else -1)
        step = labelled if 0 <= labelled < len(LABELS) else place  # "z) 1*3=3" is no step's label: its place
        op = _OPERATORS.get(match["op"].lower(), match["op"])
        steps.append(StepLine(int(integer_value(match["a"])), op, int(integer_value(match["b"])),
                              int(integer_value(match["value"])), offset + end, step))
    return steps


def _line_scores(lines: list[StepLine], steps: list[str]) -> list[float]:
    """1.0 or 0.0 for each of the `lines` of a completion: right when it is the first line for its step, that step
    is one of the gold `steps`, it computes correctly and its value is the step's gold value."""
    # gold values read as answers are ("+999", "1,008", "12.0"): as integers
    gold = [canonical_integer(str(value)) for value in steps]
    seen: set[int] = set()
    scores = []
    for line in lines:
        first = line.step not in seen
        seen.add(line.step)
        scores.append(1.0 if first and 0 <= line.step < len(gold) and _apply(line.a, line.op, line.b) == line.value
                      and str(line.value) == gold[line.step] else 0.0)
    return scores


def _prompt(start: int, ops: tuple[tuple[str, int], ...]) -> str:
    """The operations one per labelled line, each written as its step line writes it (`b) x*3`, `b) 12*3=36`)."""
    listed = "\n".join(f"{LABELS[j]}) x{op}{x}" for j, (op, x) in enumerate(ops))
    return f"Start with {start}. Apply in order:\n{listed}\nWhat is the result?"


def _draw_chain(rng: random.Random, min_steps: int, max_steps: int) -> Chain:
    start = rng.randint(2, 20)
    value, ops, length = start, [], rng.randint(min_steps, max_steps)
    while len(ops) < length:
        # No multiplying 0 (a step that changes nothing) or past MAX_VALUE; no operation twice in a chain
        # (the next one would be ambiguous to look up).
        choices = "+-*" if value != 0 and abs(value) * 9 <= MAX_VALUE else "+-"
        op = rng.choice(choices)
        x = rng.randint(2, 9) if op == "*" else rng.randint(1, 9)
        if (op, x) in ops:
            continue
        ops.append((op, x))
        value = _apply(value, op, x)
    return start, tuple(ops)


def _work(start: int, ops: tuple[tuple[str, int], ...],
          mistake: tuple[int, int] | None = None) -> tuple[list[str], list[int]]:
    """The step lines and values of a chain; `mistake=(j, delta)` puts step j off by delta, and the
    later steps compute correctly from the wrong value."""
    value, lines, values = start, [], []
    for j, (op, x) in enumerate(ops):
        result = _apply(value, op, x)
        if mistake is not None and mistake[0] == j:
            result += mistake[1]
        lines.append(f"{LABELS[j]}) {value}{op}{x}={result}")
        values.append(result)
        value = result
    return lines, values


def _wrong_completions(chain: Chain) -> tuple[tuple[str, float], ...]:
    """One mistake at each step j (closeness j/n: the share of right steps), plus stopping one step
    early (closeness between its neighbours). Closest first."""
    start, ops = chain
    n = len(ops)
    candidates = []
    for j in range(n):
        delta = DELTAS[(start + j) % len(DELTAS)]
        lines, values = _work(start, ops, mistake=(j, delta))
        candidates.append((_write(lines, values[-1]), j / n))
    if n > 1:  # a chain of one step has no step before its last to stop at
        lines, values = _work(start, ops)
        candidates.append((_write(lines[:-1], values[-2]), (n - 1.5) / n))
    return tuple(sorted(candidates, key=lambda c: -c[1]))


def _write(lines: list[str], answer: int) -> str:
    return "\n".join([*lines, f"Answer: {answer}"])


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _key(chain: Chain) -> str:
    start, ops = chain
    return f"{start}" + "".join(f"{op}{x}" for op, x in ops)


def _parse_key(key: str) -> Chain:
    digits = len(key) - len(key.lstrip("0123456789"))
    return int(key[:digits]), tuple((op, int(x)) for op, x in _KEY_OP.findall(key[digits:]))
