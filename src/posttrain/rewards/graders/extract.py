"""Reading an answer out of a chain of thought, for graders that compare answers rather than whole texts.

Available in grader templates as filters: `{{ sample.output_text | last_number }}`, `| boxed`,
`| answer_line`, `| regex("pattern")`. Each returns "" when there is nothing to extract, so a
comparison with the gold answer simply fails.
"""

from __future__ import annotations

import re

# A number as it stands in a text: a sign (the minus sign U+2212 too), thousands separators, a fraction (".5" too),
# an exponent; never a piece of a longer one ("1,0000" holds no number, "1.5e3" is no 3, "−5" no 5).
NUMBER = re.compile(r"(?<![\d.,])[-+\u2212]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
                    r"(?!\d|[.,]\d)")
# last_number also reads a fraction whole ("1/2" is no 2).
_LAST = re.compile(rf"{NUMBER.pattern}(?:/{NUMBER.pattern})?")
ANSWER_LINE = re.compile(r"^\s*(?:final\s+)?answer\s*[:：]\s*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)


def number_text(text: str) -> str:
    """A `NUMBER` written for a comparison: no thousands separators, a plain minus, no plus, no zero fraction
    ("−1,024.0" -> "-1024", "+5" -> "5")."""
    text = text.replace(",", "").replace("\u2212", "-").removeprefix("+")
    return re.sub(r"(?<=\d)\.0+(?=$|[eE/])", "", text)


def last_number(text: str) -> str:
    """The last number in the text as `number_text` writes it ("... so 1,024." -> "1024"), a fraction whole
    ("1/2")."""
    found = [match.group() for match in _LAST.finditer(text)]
    return number_text(found[-1]) if found else ""


def boxed(text: str) -> str:
    r"""The content of the last \boxed{...}, with nested braces (\boxed{\frac{1}{2}} -> \frac{1}{2})."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return ""
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i].strip()
            depth -= 1
    return ""  # unbalanced: the model never closed the box


def answer_line(text: str) -> str:
    """What follows the last `Answer:` (or `Final answer:`) at the start of a line."""
    found = ANSWER_LINE.findall(text)
    return found[-1] if found else ""


def regex(text: str, pattern: str, group: int = 1) -> str:
    """The given group (the whole match for a pattern without groups) of the pattern's last match."""
    matches = list(re.finditer(pattern, text))
    if not matches:
        return ""
    last = matches[-1]
    if last.re.groups and not 0 <= group <= last.re.groups:
        raise ValueError(f"regex({pattern!r}, {group!r}): the pattern has groups 0 to {last.re.groups}")
    return last.group(group if last.re.groups else 0) or ""  # a group that took no part in the match: ""


EXTRACTORS = {"last_number": last_number, "boxed": boxed, "answer_line": answer_line, "regex": regex}
