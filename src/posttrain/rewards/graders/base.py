"""What every grader shares: the result type, the sample/item records, and a spec reader whose errors
name the grader file, line and field.

A grader reads one `sample` (what the model wrote: `{"output_text": ...}`) and one `item` (the data row:
question, gold answer, reference text, any other column) and returns a score in [0, 1]. Graders grade
batches (`grade(samples, items)`), so a model-backed grader can batch its forward passes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from posttrain.errors import ConfigError

Sample = Mapping[str, Any]
Item = Mapping[str, Any]


@dataclasses.dataclass
class GradeResult:
    """scores: one score in [0, 1] per sample; components: the scores of the graders inside a `multi`
    grader (by name, for the logs); errors: None, or why the sample's score was forced to 0."""

    scores: list[float]
    components: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    errors: list[str | None] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.errors:
            self.errors = [None] * len(self.scores)

    @property
    def error_count(self) -> int:
        return sum(e is not None for e in self.errors)


class Grader(Protocol):
    name: str

    def grade(self, samples: Sequence[Sample], items: Sequence[Item]) -> GradeResult: ...


def checked_score(value: Any) -> tuple[float, str | None]:
    """(score, None) for a finite number in [0, 1]; (0, why) for anything else (the run goes on)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0, f"grade returned {type(value).__name__}, not a number"
    if not math.isfinite(value):
        return 0.0, f"grade returned {value!r}, not a finite number"
    if not 0.0 <= value <= 1.0:
        return 0.0, f"grade returned {value!r}, outside [0, 1]"
    return float(value), None


@dataclasses.dataclass(frozen=True)
class Spec:
    """One grader's mapping from a YAML file, with where every key was written (for ConfigError)."""

    data: Mapping[str, Any]
    prefix: str = ""
    file: str | None = None
    lines: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def error(self, message: str, key: str | None = None) -> ConfigError:
        field = self.prefix + key if key else self.prefix.rstrip(".") or None
        line = self.lines.get(field) if field else None
        if line is None and self.prefix:
            line = self.lines.get(self.prefix.rstrip("."))
        return ConfigError(message, file=self.file, line=line, field=field)

    def only(self, *allowed: str) -> None:
        for key in self.data:
            if key not in allowed:
                raise self.error(f"unknown key; a {self.data.get('type')} grader takes {', '.join(allowed)}", key)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., choices: Sequence[Any] | None = None):
        if key not in self.data:
            if default is ...:
                raise self.error("is required", key)
            return default
        value = self.data[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.error(f"{value!r} is not a {_names(kind)}", key)
        if not isinstance(value, kind):
            raise self.error(f"{value!r} is not a {_names(kind)}", key)
        if choices is not None and value not in choices:
            raise self.error(f"{value!r} is not one of {', '.join(map(str, choices))}", key)
        return value

    def child(self, key: str) -> Spec:
        value = self.data.get(key)
        if not isinstance(value, Mapping):
            raise self.error("must be a mapping", key)
        return Spec(value, f"{self.prefix}{key}.", self.file, self.lines)


def _names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"str": "text", "int": "integer", "float": "number", "list": "list",
                        "dict": "mapping"}.get(k.__name__, k.__name__) for k in kinds)
