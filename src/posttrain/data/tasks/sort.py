"""`sort`: put 3-6 distinct numbers in ascending order — a different skill from arithmetic.

    prompt:      Sort from smallest to largest: 42 7 19
    completion:  7 19 42

Wrong answers are the mistakes a model makes on the way: one adjacent pair swapped, the list left
as given, sorted the wrong way round, a number dropped. Their closeness is the share of positions
that hold the right number.
"""

from __future__ import annotations

import random

from posttrain.data.tasks.base import (
    INTEGER,
    RANKING_SIZE,
    Example,
    Task,
    answer_text,
    canonical_integer,
    closest_first,
    is_heldout_key,
)

MAX_NUMBER = 99


class SortTask(Task):
    name = "sort"
    description = "sort 3-6 distinct numbers in ascending order; the answer is the sorted list"

    def example(self, rng: random.Random, split: str = "train") -> Example:
        while True:
            numbers = rng.sample(range(MAX_NUMBER + 1), rng.randint(3, 6))
            key = " ".join(map(str, numbers))
            if numbers != sorted(numbers) and is_heldout_key(key) == (split == "heldout"):
                break
        answer = " ".join(map(str, sorted(numbers)))
        return Example(key=key, prompt=f"Sort from smallest to largest: {key}", answer=answer,
                       completion=answer, wrong=closest_first(_wrong_answers(numbers), RANKING_SIZE - 1),
                       separator="\n")

    def category(self, example: Example) -> str:
        return f"{len(example.key.split())} numbers"

    def extract_answer(self, completion: str) -> str | None:
        """The numbers on the first non-empty line after any thinking block, space-separated."""
        text = answer_text(completion)
        if text is None:
            return None
        line = next((line for line in text.splitlines() if line.strip()), "")
        numbers = INTEGER.findall(line)
        return " ".join(str(int(n)) for n in numbers) if numbers else None

    def canonical_answer(self, answer: str) -> str | None:
        """The sorted numbers, space-separated, each as an integer; None if any is not one."""
        numbers = [canonical_integer(n) for n in answer.replace(",", " ").split()]
        return " ".join(numbers) if numbers and None not in numbers else None


def _wrong_answers(numbers: list[int]) -> dict[str, float]:
    right = sorted(numbers)
    candidates = [list(numbers), right[::-1], right[:-1], right[1:]]
    for i in range(len(right) - 1):
        swapped = list(right)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        candidates.append(swapped)
    scored = {}
    for candidate in candidates:
        if candidate != right:
            hits = sum(a == b for a, b in zip(candidate, right, strict=False))
            scored[" ".join(map(str, candidate))] = hits / len(right)
    return scored
