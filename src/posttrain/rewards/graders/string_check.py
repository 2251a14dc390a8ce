"""`string_check`: 1 when the rendered input and reference compare as asked, else 0.

    eq     input == reference            ne     input != reference
    like   reference is a substring of input (case-sensitive)
    ilike  the same, ignoring case
(the public fine-tuning grader schema's operations; both sides are stripped of surrounding blanks).
"""

from __future__ import annotations

from collections.abc import Sequence

from posttrain.rewards.graders.base import GradeResult, Item, Sample, Spec
from posttrain.rewards.graders.template import template_field

OPERATIONS = {
    "eq": lambda text, ref: text == ref,
    "ne": lambda text, ref: text != ref,
    "like": lambda text, ref: ref in text,
    "ilike": lambda text, ref: ref.lower() in text.lower(),
}


class StringCheckGrader:
    def __init__(self, spec: Spec) -> None:
        spec.only("type", "name", "input", "reference", "operation")
        self.name = spec.get("name", str, "string_check")
        self.input, self.reference = template_field(spec, "input"), template_field(spec, "reference")
        self.compare = OPERATIONS[spec.get("operation", str, choices=tuple(OPERATIONS))]

    def grade(self, samples: Sequence[Sample], items: Sequence[Item]) -> GradeResult:
        return GradeResult([float(self.compare(self.input.render(s, i).strip(), self.reference.render(s, i).strip()))
                            for s, i in zip(samples, items, strict=True)])
