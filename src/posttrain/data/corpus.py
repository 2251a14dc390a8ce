"""Built-in synthetic pretraining text: number facts, arithmetic written several ways, dialogues.

The point is not to solve tasks but to start later stages from a model that already reads digits,
the words around numbers and the chat template. Arithmetic statements only use training-split
problems (`arith.is_heldout`), and worked chains none of the multistep task's held-out chains, so held-out evaluation
stays clean.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from posttrain.data.arith import Problem, few_shot_prompt, is_heldout, sample_problem, solved_line
from posttrain.data.tasks.base import is_heldout_key

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_OP_WORDS = {"+": ("plus", "the sum of {a} and {b}"), "-": ("minus", "the difference of {a} and {b}"),
             "*": ("times", "the product of {a} and {b}")}
_GREETINGS = [("Hello!", "Hello! How can I help you today?"), ("Hi there.", "Hi! What would you like to do?"),
              ("Thank you!", "You are welcome."), ("Who are you?", "I am a small assistant that likes numbers."),
              ("Good morning.", "Good morning! Ask me anything about numbers.")]


def number_word(n: int) -> str:
    """English words for 0..99 (negative numbers get 'minus')."""
    if n < 0:
        return "minus " + number_word(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])
    return str(n)


def _number_fact(rng: random.Random) -> str:
    n = rng.randint(0, 99)
    facts = [
        f"{n} is written {number_word(n)}.",
        f"{n} is {'even' if n % 2 == 0 else 'odd'}.",
        f"{n} has {n // 10} tens and {n % 10} ones.",
    ]
    # Facts that solve an arith problem (n+1, n+1-1; n+n, 2*n, n*2) are stated only where no such problem is held out.
    if not any(map(is_heldout, [Problem(n, "+", 1), Problem(n + 1, "-", 1)])):
        facts.append(f"The number after {n} is {n + 1}. The number before {n + 1} is {n}.")
    if not any(map(is_heldout, [Problem(n, "+", n), Problem(2, "*", n), Problem(n, "*", 2)])):
        facts.append(f"{n} doubled is {2 * n}.")
    m = rng.randint(0, 99)
    facts.append(f"{min(n, m)} is less than or equal to {max(n, m)}.")
    start = rng.randint(0, 90)
    facts.append("Counting: " + " ".join(str(k) for k in range(start, start + rng.randint(3, 9))))
    return " ".join(rng.sample(facts, k=rng.randint(1, 3)))


def _arithmetic_statement(rng: random.Random) -> str:
    p = sample_problem(rng, "train")
    word, phrase = _OP_WORDS[p.op]
    forms = [
        f"{p.a} {p.op} {p.b} = {p.answer}",
        f"{p.expression}={p.answer}",
        f"{number_word(p.a)} {word} {number_word(p.b)} is {number_word(p.answer)}.",
        f"{phrase.format(a=p.a, b=p.b).capitalize()} is {p.answer}.",
        solved_line(p),
    ]
    return rng.choice(forms)


def _few_shot_block(rng: random.Random) -> str:
    p = sample_problem(rng, "train")
    return f"{few_shot_prompt(p, rng)} {p.answer}"


def _chain(rng: random.Random) -> str:
    value = rng.randint(0, 20)
    lines, key = [f"Start with {value}."], str(value)
    for _ in range(rng.randint(2, 4)):
        for _ in range(100):  # each step solves a problem of the training split only, as every other kind of text does
            step = Problem(value, rng.choice("+-*"), rng.randint(1, 9))
            # and the chain so far is none of the multistep task's held-out chains (keyed as the task keys them)
            if not is_heldout(step) and not (len(lines) > 1 and is_heldout_key(f"{key}{step.op}{step.b}")):
                break
        else:
            break  # no step continues it cleanly: the chain ends here
        lines.append(f"{step.expression}={step.answer}")
        key, value = f"{key}{step.op}{step.b}", step.answer
    lines.append(f"The result is {value}.")
    return "\n".join(lines)


def _dialogue(rng: random.Random) -> list[dict[str, str]]:
    kind = rng.randrange(4)
    if kind == 0:
        user, assistant = rng.choice(_GREETINGS)
    elif kind == 1:
        p = sample_problem(rng, "train")
        user, assistant = p.question(), str(p.answer)
    elif kind == 2:
        a, b = rng.sample(range(100), 2)
        user, assistant = f"Which is larger, {a} or {b}?", str(max(a, b))
    else:
        start = rng.randint(0, 90)
        stop = start + rng.randint(2, 8)
        user, assistant = f"Count from {start} to {stop}.", " ".join(str(k) for k in range(start, stop + 1))
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    if rng.random() < 0.2:
        messages.insert(0, {"role": "system", "content": "You are a helpful assistant."})
    return messages


# Arithmetic dominates the mix: solved problems are what later stages build on, and every token of a
# few-shot block is a training target here (in SFT only the answer is).
_TEXT_KINDS: list[Callable[[random.Random], str]] = [_number_fact, _arithmetic_statement, _few_shot_block, _chain]
_TEXT_WEIGHTS = [1, 3, 8, 1]


def synthetic_documents(seed: int, chat_share: float = 0.25) -> Iterator[str | list[dict[str, str]]]:
    """An endless stream of documents: plain strings, or message lists for chat-formatted ones."""
    rng = random.Random(seed)
    while True:
        if rng.random() < chat_share:
            yield _dialogue(rng)
        else:
            yield rng.choices(_TEXT_KINDS, weights=_TEXT_WEIGHTS)[0](rng)


def plain_text(document: str | list[dict[str, str]]) -> str:
    """A document as plain text (dialogues flattened), for training the tokenizer's merges."""
    if isinstance(document, str):
        return document
    return "\n".join(m["content"] for m in document)
