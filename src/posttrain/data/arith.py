"""The `arith` problem space: "What is a∘b?" with a, b in 0..99 and ∘ in + - *.

The train / held-out split is a property of the problem itself (a hash of a, op, b), not of the
order in which problems are drawn, so every stage — pretraining text included — agrees on which
problems are never trained on, whatever seed or size it uses.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

OPS = ("+", "-", "*")
MAX_OPERAND = 99
HELDOUT_SHARE = 10  # one problem in HELDOUT_SHARE is held out: ~3,000 of the 30,000


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        if self.op == "+":
            return self.a + self.b
        if self.op == "-":
            return self.a - self.b
        return self.a * self.b

    @property
    def expression(self) -> str:
        return f"{self.a}{self.op}{self.b}"

    def question(self) -> str:
        return f"What is {self.expression}?"


def is_heldout(problem: Problem) -> bool:
    """Whether a problem belongs to the held-out split (stable across runs and versions)."""
    return zlib.crc32(problem.expression.encode()) % HELDOUT_SHARE == 0


def all_problems(split: str) -> list[Problem]:
    """Every problem of a split, in a fixed order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    want_heldout = split == "heldout"
    return [p for op in OPS for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)
            if is_heldout(p := Problem(a, op, b)) == want_heldout]


def sample_problem(rng: random.Random, split: str = "train") -> Problem:
    """Draw one problem of `split` uniformly over (op, a, b) by rejection."""
    want_heldout = split == "heldout"
    while True:
        problem = Problem(rng.randint(0, MAX_OPERAND), rng.choice(OPS), rng.randint(0, MAX_OPERAND))
        if is_heldout(problem) == want_heldout:
            return problem


def solved_line(problem: Problem) -> str:
    return f"{problem.question()} {problem.answer}"


def few_shot_prompt(problem: Problem, rng: random.Random, max_shots: int = 6) -> str:
    """0..max_shots solved training problems, one per line, then the question.

    Few-shot lines always come from the training split: a held-out answer never appears in text.
    """
    shots = [solved_line(sample_problem(rng, "train")) for _ in range(rng.randint(0, max_shots))]
    return "\n".join([*shots, problem.question()])
