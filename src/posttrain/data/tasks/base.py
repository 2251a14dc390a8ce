"""What every built-in task provides: seeded examples, rows in every format, an extractor and a verifier.

A task only has to say how to draw one `Example` (a problem with its correct completion and a few
plausible wrong ones, each with a closeness score) and how to read an answer out of a completion;
the rows of every format follow from that in one place. The train / held-out split is a property
of the problem (a hash of its key), so the two splits can never share a problem whatever the seed
or size.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

HELDOUT_SHARE = 10  # one problem in HELDOUT_SHARE is held out
SPLITS = ("train", "heldout")
RANKING_SIZE = 4  # responses per ranking row: the correct one and 3 wrong ones

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# An integer as answers are written: a sign (the minus sign U+2212 too), thousands separators ("1,008" is 1008, not 1),
# a zero fraction ("+1,000.0" is 1000).
WHOLE_INTEGER = r"[+\-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)"
INTEGER_TEXT = rf"{WHOLE_INTEGER}(?:\.0+)?"
# One in a completion stands alone: not a piece of a decimal ("5.7" and ".5" are no 5) nor of a longer run of digits
# ("1,0089" is no 1,008).
ANSWER_INTEGER = rf"(?<![\d.,]){INTEGER_TEXT}(?!\d|[.,]\d)"
INTEGER_ANSWER = re.compile(INTEGER_TEXT)  # a gold answer: the whole text


def integer_value(text: str) -> str:
    """An integer written as `INTEGER_TEXT` in the extractors' form ("+1,008" -> "1008", "−5.0" -> "-5")."""
    return str(int(text.replace("\u2212", "-").split(".")[0].replace(",", "")))


def canonical_integer(text: str) -> str | None:
    """An integer gold answer as the extractors write theirs ("05", "+5", "5.0", "1,000" -> "5", "5", "5", "1000"),
    or None when the text is no integer ("5.5", "12 apples")."""
    text = text.strip()
    return integer_value(text) if INTEGER_ANSWER.fullmatch(text) else None


@dataclass(frozen=True)
class Example:
    """One problem instance.

    `completion` is the correct answer as an assistant would write it; `wrong` holds plausible wrong
    completions, each with a closeness score in [0, 1) (1 would be correct), closest first.
    `separator` is what joins prompt and completion in raw text (" " for `What is 2+3? 5`).
    """

    key: str
    prompt: str
    answer: str
    completion: str
    wrong: tuple[tuple[str, float], ...]
    separator: str = " "
    steps: tuple[str, ...] = ()  # per-step gold values, for tasks solved in steps


def is_heldout_key(key: str) -> bool:
    """Whether the problem with this key is held out (stable across runs, seeds and versions)."""
    return zlib.crc32(key.encode()) % HELDOUT_SHARE == 0


def answer_text(completion: str) -> str | None:
    """The part of a completion after its thinking block; None while the block is still open."""
    close = completion.rfind(THINK_CLOSE)
    if close >= 0:
        return completion[close + len(THINK_CLOSE):]
    if THINK_OPEN in completion:
        return None
    return completion


def first_integer(text: str) -> str | None:
    match = re.search(ANSWER_INTEGER, text)
    return integer_value(match.group()) if match else None


# Markup that may wrap an answer: **8**, $8$, `8`, (8), [8], \(8\), \boxed{8}.
_MARKUP = r"(?:[\s*_$`(\[{]|\\\(|\\(?:boxed|text|mathbf)\{)*"
_NUMBER = r"[+\-\u2212]?\d+(?:,\d+)*(?:\.\d+)?"  # a number as written, integer or not ("35.9" is one, and no integer)
_OPERATOR = r"[-+*/x\u00d7\u00b7\u2212]"
# A stated answer: a cue ("Answer:", "answer is", "Final answer:", "The result is"; any case) right before a number,
# through markup, on its line or the next: "the answer is correct" and "Result: verified" state none.
ANSWER_CUE = re.compile(rf"\b(?:answer|result)\b[*_ \t]*(?:is\b|:|=){_MARKUP}(?=[+\-\u2212]?\d)", re.IGNORECASE)
_NO_ANSWER = re.compile(r"\banswer\b[*_ \t]*:[*_ \t]*(?:none|n/?a|unknown|no answer)\b", re.IGNORECASE)
_EXPRESSION = re.compile(rf"{_MARKUP}{WHOLE_INTEGER}(?:[ \t]*{_OPERATOR}[ \t]*{WHOLE_INTEGER})+")  # "3+5", "23+17-9"
_LEADING = re.compile(rf"{_MARKUP}({_NUMBER})")
_RESULT_VALUE = re.compile(rf"=[ \t]*{_MARKUP}({_NUMBER})(?![ \t]*{_OPERATOR}[ \t]*\d)")  # "=8", not "= 40-9"
_LIST_MARKER = re.compile(rf"^[ \t]*(?:\d{{1,2}}[.)]|[-*\u2022]|step[ \t]*\d+[ \t]*[:.)])[ \t]+(?={_MARKUP}\d)",
                          re.IGNORECASE | re.MULTILINE)  # "1. ", "- ", "Step 1: " before a number
_QUESTION = re.compile(r"^[ \t]*[^\n?]*\?")  # a restated question ("What is 3+5?") before the answer
NOT_STATED = "not stated"  # what `stated_answer` returns for a completion that states no answer


def stated_answer(text: str) -> str | None:
    """The integer of the last answer a completion states (`ANSWER_CUE`, read from there on as `computed_answer`
    reads a whole answer), None when it is no integer ("Answer: 35.9") or states none ("Answer: none"), NOT_STATED
    without a cue."""
    cues = list(ANSWER_CUE.finditer(text))
    refusals = list(_NO_ANSWER.finditer(text))
    if refusals and (not cues or refusals[-1].start() > cues[-1].start()):
        return None
    return _read(text[cues[-1].end():]) if cues else NOT_STATED


def computed_answer(text: str) -> str | None:
    """The integer an answer to one problem gives: the stated answer (`stated_answer`), else what the text says
    after any restated question: a direct answer it opens with ("8", "8 = 3+5", "8\nCheck: 8-3=5", "-35. Since
    ..."), else the last result of what it works out ("3+5=8", "We add: 3+5=8", "23+17=40\n40-9=31", "5-3-4 = 2-4 =
    -2"; a worked line cut before its value or with no integer one gives None), else the first number after an
    expression it opens with ("3+5 is 8"), else its first integer."""
    stated = stated_answer(text)
    return stated if stated is not NOT_STATED else _read(_QUESTION.sub("", text, count=1))


def _read(text: str) -> str | None:
    text = _LIST_MARKER.sub("", text.lstrip())
    expression = _EXPRESSION.match(text)
    if expression is None and (lead := _LEADING.match(text)):
        return _integer(lead.group(1))
    results = _RESULT_VALUE.findall(text)
    if results:
        return _integer(results[-1])
    if expression is not None:
        rest = text[expression.end():]
        if rest.lstrip(" \t*_$`)").startswith("="):
            return None  # a worked line cut before its value ("12+5="), or with none that is a number
        return first_integer(rest)
    return first_integer(text)


def _integer(number: str) -> str | None:
    """A number as written, as an integer answer, or None when it is none ("35.9", "1,0089")."""
    return integer_value(number) if re.fullmatch(ANSWER_INTEGER, number) else None


class Task:
    """A built-in task. Subclasses set `name`, `description`, and implement `example` and `extract_answer`."""

    name: str = ""
    description: str = ""
    formats: tuple[str, ...] = ("completion", "messages", "preference", "ranking", "verifiable", "unpaired")

    def example(self, rng: random.Random, split: str = "train") -> Example:
        raise NotImplementedError

    def extract_answer(self, completion: str) -> str | None:
        """The answer a completion gives (read after any thinking block), or None if it gives none."""
        raise NotImplementedError

    def category(self, example: Example) -> str | None:
        """The kind of problem an example is (evaluation reports headroom per category), or None: one kind."""
        return None

    def canonical_answer(self, answer: str) -> str | None:
        """A gold answer as `extract_answer` writes the answers it reads (an integer here), or None when the task
        cannot verify it (a user's data file checks its answers with this: `eval.heldout.check_gold_answers`)."""
        return canonical_integer(answer)

    def verify(self, completion: str, answer: str) -> float:
        """1.0 when the extracted answer equals the gold answer (in its canonical form), else 0.0 (an RL reward)."""
        gold = self.canonical_answer(answer)
        return 1.0 if gold is not None and self.extract_answer(completion) == gold else 0.0

    def is_heldout(self, example: Example) -> bool:
        return is_heldout_key(example.key)

    def examples(self, split: str, size: int, seed: int) -> Iterator[Example]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        # The seed is mixed with the split so that train and held-out streams are independent.
        rng = random.Random(f"{self.name}:{split}:{seed}")
        for _ in range(size):
            yield self.example(rng, split)

    def rows(self, fmt: str, split: str = "train", size: int = 1000, seed: int = 0) -> Iterator[dict]:
        """`size` rows of format `fmt` (raw form, as a user's file would hold them)."""
        if fmt not in self.formats:
            raise ValueError(f"task {self.name!r} yields {', '.join(self.formats)}, not {fmt!r}")
        rng = random.Random(f"{self.name}:{split}:{seed}:rows")
        for example in self.examples(split, size, seed):
            yield self.row(example, fmt, rng)

    def row(self, example: Example, fmt: str, rng: random.Random) -> dict:
        if fmt == "completion":
            return {"prompt": example.prompt, "completion": example.separator + example.completion}
        if fmt == "messages":
            return {"messages": [{"role": "user", "content": example.prompt},
                                 {"role": "assistant", "content": example.completion}]}
        if fmt == "preference":
            rejected, _ = rng.choice(example.wrong)
            return {"prompt": example.prompt, "chosen": example.completion, "rejected": rejected}
        if fmt == "ranking":
            wrong = example.wrong[:RANKING_SIZE - 1]
            return {"prompt": example.prompt, "responses": [example.completion, *(w for w, _ in wrong)],
                    "scores": [1.0, *(score for _, score in wrong)]}
        if fmt == "verifiable":
            row = {"prompt": example.prompt, "answer": example.answer}
            return row | {"steps": list(example.steps)} if example.steps else row
        if fmt == "unpaired":  # the right answer (desirable) or a near miss (undesirable), even odds
            if rng.random() < 0.5:
                return {"prompt": example.prompt, "completion": example.completion, "label": True}
            return {"prompt": example.prompt, "completion": rng.choice(example.wrong)[0], "label": False}
        raise ValueError(f"task {self.name!r} does not yield {fmt!r} rows")


def closest_first(candidates: dict[str, float], count: int) -> tuple[tuple[str, float], ...]:
    """The `count` highest-scoring candidates with distinct scores, best first.

    Distinct scores keep rankings strict (a Plackett-Luce order is undefined between ties); ties
    are broken by a hash of the text: deterministic, and unbiased. (Breaking them by the text itself
    picked "121" over "123" for the answer 122 — the lower neighbour almost always — so preference
    data taught a model to shun answers below the truth, and DPO on it shifted answers upwards.)
    """
    chosen: list[tuple[str, float]] = []
    for text, score in sorted(candidates.items(), key=lambda item: (-item[1], zlib.crc32(item[0].encode()))):
        if all(score != other for _, other in chosen):
            chosen.append((text, score))
    return tuple(chosen[:count])
