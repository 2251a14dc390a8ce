"""`arith`: "What is a∘b?" (a, b in 0..99, ∘ in + - *) after 0-6 solved few-shot lines.

Built on `posttrain.data.arith`, the problem space the pretraining corpus also draws from, so the
held-out problems are the same ones pretraining never saw.
"""

from __future__ import annotations

import random

from posttrain.data import arith
from posttrain.data.tasks.base import RANKING_SIZE, Example, Task, answer_text, closest_first, computed_answer


class ArithTask(Task):
    name = "arith"
    description = "two-operand arithmetic with few-shot examples; the answer is one integer"

    def __init__(self, max_shots: int = 6) -> None:
        self.max_shots = max_shots

    def example(self, rng: random.Random, split: str = "train") -> Example:
        problem = arith.sample_problem(rng, split)
        answer = problem.answer
        return Example(key=problem.expression, prompt=arith.few_shot_prompt(problem, rng, self.max_shots),
                       answer=str(answer), completion=str(answer),
                       wrong=closest_first(_wrong_answers(problem), RANKING_SIZE - 1))

    def category(self, example: Example) -> str:
        """The operator: addition, subtraction and multiplication are different skills for a small model."""
        return _parse(example.key).op

    def is_heldout(self, example: Example) -> bool:
        return arith.is_heldout(_parse(example.key))

    def extract_answer(self, completion: str) -> str | None:
        """After any thinking block: the integer a model answering `What is 2+3?` writes, or the one it states
        ("Answer: 5"), or the result of the line it works ("2+3=5": its first integer is the question's 2, which
        would pay a model for repeating the question)."""
        text = answer_text(completion)
        return None if text is None else computed_answer(text)


def _wrong_answers(problem: arith.Problem) -> dict[str, float]:
    """Mistakes people make: off by one or ten, the wrong operator, swapped digits; scored by closeness."""
    answer = problem.answer
    candidates = {answer + 1, answer - 1, answer + 10, answer - 10, int(str(abs(answer))[::-1]) * (
        -1 if answer < 0 else 1)}
    candidates |= {arith.Problem(problem.a, op, problem.b).answer for op in arith.OPS}
    return {str(c): 1.0 / (1.0 + abs(c - answer)) for c in candidates if c != answer}


def _parse(expression: str) -> arith.Problem:
    for op in arith.OPS:
        left, sep, right = expression.partition(op)
        if sep and left and right:
            return arith.Problem(int(left), op, int(right))
    raise ValueError(f"not an arith expression: {expression!r}")
