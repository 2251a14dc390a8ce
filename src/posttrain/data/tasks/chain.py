"""`chain`: "What is 23+17-9?", answered either at once ("31") or worked in two steps ("23+17=40\\n40-9=31").

The SFT rows mix the two ways of answering, two in five worked and the rest direct, as demonstrations
written by different people would. They are not equally good for a small model: a two-step line is two
additions or subtractions of the kind it already does well, while the direct answer asks for three operands in
one go. Which way works is a behaviour shared by every problem, so a reward that only checks the final answer
can teach it (RL shifts the policy towards the way that succeeds more often), and what it learns transfers to
held-out problems, unlike a table of separate facts. Operands are 0-49 and a first subtraction never goes below
0, so every step is a two-operand problem of the arith range (0-99).
"""

from __future__ import annotations

import random

from posttrain.data.tasks.base import (
    RANKING_SIZE,
    Example,
    Task,
    answer_text,
    closest_first,
    computed_answer,
    is_heldout_key,
)

MAX_OPERAND = 49
OPS = ("+", "-")
# The share of SFT rows that work the problem in steps. With half of them, the demo's SFT model already answered
# in steps 89% of the time when decoding greedily, so RL's gain in greedy accuracy was only what the worked answers'
# arithmetic could add (+2 to +6 points over draws). With fewer, greedy decoding answers directly part of the time
# and RL has a behaviour to adopt (Intel Xeon, 2026-12-03, 500 held-out problems, greedy; worked share of greedy
# answers in brackets): 0.35: SFT 28.6% (45%), GRPO +29.6, PPO +27.2, DPO +26.8, RFT +23.8, rejection +32.0,
# continued SFT +2.8, GRPO on a coin +4.4; 0.42: SFT 36.0% (58%), GRPO +29.4; 0.25: SFT 14.4% (7%), GRPO +23.2.
# The reward model pays for it (the demo's rm stage says how much): more of the right samples are direct answers,
# right by luck, which its likelihood cannot tell from wrong ones.
WORKED_SHARE = 0.4


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y


class ChainTask(Task):
    name = "chain"
    description = "a+b-c with two operators, answered directly or worked in two steps (two in five SFT rows)"

    def __init__(self, worked_share: float = WORKED_SHARE) -> None:
        self.worked_share = worked_share

    def example(self, rng: random.Random, split: str = "train") -> Example:
        while True:
            a, b, c = (rng.randint(0, MAX_OPERAND) for _ in range(3))
            first, second = rng.choice(OPS), rng.choice(OPS)
            if first == "-" and a < b:
                a, b = b, a  # the intermediate value stays >= 0, like every arith first operand
            key = f"{a}{first}{b}{second}{c}"
            if is_heldout_key(key) == (split == "heldout"):
                break
        middle = _apply(a, first, b)
        answer = _apply(middle, second, c)
        worked = rng.random() < self.worked_share
        lines = [f"{a}{first}{b}={middle}", f"{middle}{second}{c}="]

        def write(value: int) -> str:
            return f"{lines[0]}\n{lines[1]}{value}" if worked else str(value)

        # Slips of one step (a unit, a ten, the sign of the last operand) and the intermediate value as the answer.
        wrong = {answer + 1, answer - 1, answer + 2, answer - 3, answer + 10, answer - 10, middle,
                 _apply(middle, "+" if second == "-" else "-", c)}
        return Example(key=key, prompt=f"What is {key}?", answer=str(answer), completion=write(answer),
                       wrong=closest_first({write(w): 1.0 / (1.0 + abs(w - answer)) for w in wrong if w != answer},
                                           RANKING_SIZE - 1),
                       steps=(str(middle), str(answer)))

    def category(self, example: Example) -> str:
        """The two operators (++, +-, -+, --)."""
        return "".join(ch for ch in example.key if ch in OPS)

    def extract_answer(self, completion: str) -> str | None:
        """A stated answer ("Answer: 31" after the steps, whatever they computed), else a worked answer's last
        computed value (None when no `=` has one: a worked answer cut short or written with no integer is no direct
        answer), else a direct answer's number."""
        text = answer_text(completion)
        return None if text is None else computed_answer(text)

    @staticmethod
    def worked(completion: str) -> bool:
        """Whether a completion works the problem in steps (it writes an `=`)."""
        return "=" in completion
