"""`sort`: put 3-6 distinct numbers in ascending order — a different skill from arithmetic.

    prompt:      Sort from smallest to largest: 42 7 19
    completion:  7 19 42

Wrong answers are the mistakes a model makes on the way: one adjacent pair swapped, the list left
as given, sorted the wrong way round, a number dropped. Their closeness is the share of positions
that hold the right number.
"""

from __future__ import annotations

import random
import re

from posttrain.data.tasks.base import (
    ANSWER_CUE,
    RANKING_SIZE,
    Example,
    Task,
    answer_text,
    closest_first,
    integer_value,
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
        """The list a completion gives, after any thinking block, as integers space-separated: the rest of the line
        of its last stated answer ("Answer: 7, 19, 42", "The answer is: [7, 19, 42]"), else its last list labelled
        as the answer ("Sorted:", "Output:", "Ascending:", "In order:"; a label alone on its line labels the next
        list), else its last list not labelled as the question ("Input:", "Given:", "Original:", "Unsorted:", "Sort
        from ...:"; "42 7 19 -> 7 19 42" is its right-hand side); a list is a line of numbers alone, after any label
        or list marker, or a column of lines of one number each ("7\n19\n42", "1. 7\n2. 19\n3. 42"); else the
        numbers of its first line."""
        text = answer_text(completion)
        if text is None:
            return None
        cue = list(ANSWER_CUE.finditer(text))
        numbers = _numbers(text[cue[-1].end():].split("\n", 1)[0]) if cue else _given_list(text)
        return " ".join(numbers) if numbers else None

    def canonical_answer(self, answer: str) -> str | None:
        """The sorted numbers, space-separated, each as an integer; None if any is not one."""
        numbers = _numbers(answer)
        return " ".join(numbers) if numbers and _LIST_ONLY.fullmatch(answer) else None


# A number of a list: "1,2,3" is three, "1,000" one (thousands), "−5" (U+2212) and "7.0" integers.
_LIST_NUMBER = re.compile(r"(?<![\d.])[-\u2212]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.0+)?(?!\d|\.\d)")
_SEPARATORS = r"[\s,;\[\]()*$`]*"
_LIST_ONLY = re.compile(rf"{_SEPARATORS}(?:{_LIST_NUMBER.pattern}{_SEPARATORS})+")  # numbers and separators only
_MARKER = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*\u2022])\s+")  # "1. ", "2) ", "- " opening a line of a list
_ARROW = re.compile(r"->|\u2192|=>")
_QUESTION_LABEL = re.compile(r"\b(?:input|given|original|unsorted|from|question)\b", re.IGNORECASE)
_ANSWER_LABEL = re.compile(r"\b(?:sorted|ascending|order|output|answer|result)\b", re.IGNORECASE)


def _numbers(text: str) -> list[str]:
    return [integer_value(n.replace(",", "")) for n in _LIST_NUMBER.findall(text)]


def _given_list(text: str) -> list[str]:
    """The numbers of the list `text` gives (see `SortTask.extract_answer`)."""
    lists: list[tuple[str, list[str]]] = []  # (what its label says: "answer", "question" or "", numbers)
    column = False  # whether the previous line was one number alone, which a column of them continues
    pending = ""  # a label alone on its line, for the list on the next
    first = next((line for line in text.splitlines() if line.strip()), "")
    for line in text.splitlines():
        line = _ARROW.split(_MARKER.sub("", line))[-1]
        label, _, body = line.rpartition(":")
        kind = ("question" if _QUESTION_LABEL.search(label) else "answer" if _ANSWER_LABEL.search(label)
                else "") if label else ""
        if not _LIST_ONLY.fullmatch(body):
            pending, column = (kind if label and not body.strip(" *_") else ""), False
            continue
        numbers = _numbers(body)
        if column and len(numbers) == 1 and not label:
            lists[-1][1].extend(numbers)
        else:
            lists.append((kind or pending, numbers))
        pending, column = "", len(numbers) == 1
    chosen = ([numbers for kind, numbers in lists if kind == "answer"]
              or [numbers for kind, numbers in lists if kind != "question"])
    return chosen[-1] if chosen else _numbers(first)


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
