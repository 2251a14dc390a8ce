"""Reading an answer out of a chain of thought, for graders that compare answers rather than whole texts.

Available in grader templates as filters: `{{ sample.output_text | last_number }}`, `| boxed`,
`| answer_line`, `| regex("pattern")`. Each returns "" when there is nothing to extract, so a
comparison with the gold answer simply fails.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
ANSWER_LINE = re.compile(r"^\s*(?:final\s+)?answer\s*[:：]\s*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)


def last_number(text: str) -> str:
    """The last number in the text, thousands separators removed ("... so 1,024." -> "1024")."""
    found = NUMBER.findall(text)
    return found[-1].replace(",", "") if found else ""


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
    return last.group(group if last.re.groups else 0)


EXTRACTORS = {"last_number": last_number, "boxed": boxed, "answer_line": answer_line, "regex": regex}
