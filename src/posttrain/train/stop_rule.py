"""`train.stop_when`: end a run early once a logged metric crosses a threshold.

"dev_step_accuracy >= 0.55" ends the run at the first step whose record (its training metrics, and its
evaluation's when one ran) has dev_step_accuracy of at least 0.55. What the rule reads should be measured
on data the run is not judged on (a dev draw, `eval.dev_problems`): a run that stops on its own test
problems has chosen its stopping step on them.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

from posttrain.errors import ConfigError

FIELD = "train.stop_when"
_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
# metric (any name without <, > or =, e.g. eval_headroom.3 steps.pass@8), comparison (">=" before ">"), number
_RULE = re.compile(r"^\s*([^<>=\s](?:[^<>=]*[^<>=\s])?)\s*(>=|<=|>|<)\s*"
                   r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclasses.dataclass(frozen=True)
class StopRule:
    metric: str
    comparison: str
    threshold: float

    @classmethod
    def parse(cls, text: str | None) -> StopRule | None:
        """The rule `text` states (None: no rule); a ConfigError naming train.stop_when when it is not one."""
        if text is None or not str(text).strip():
            return None
        match = _RULE.match(str(text))
        if match is None:
            raise ConfigError(f"{text!r} is not a stopping rule: write METRIC OP NUMBER with OP one of "
                              f"{', '.join(_COMPARISONS)} (e.g. 'dev_step_accuracy >= 0.55')", field=FIELD)
        metric, comparison, threshold = match.groups()
        return cls(metric, comparison, float(threshold))

    def met(self, record: Mapping[str, Any]) -> bool:
        """Whether `record` has the metric and it satisfies the rule (NaN never does; an infinity compares as a
        number)."""
        value = record.get(self.metric)
        if not isinstance(value, (int, float)) or value != value:
            return False
        return _COMPARISONS[self.comparison](float(value), self.threshold)

    def __str__(self) -> str:
        return f"{self.metric} {self.comparison} {self.threshold:g}"

    def describe(self, record: Mapping[str, Any]) -> str:
        """The rule with the value that met it, for the log and the run's summary."""
        return f"{self.metric} = {record[self.metric]:.4g} {self.comparison} {self.threshold:g}"

    def refuse_unlogged(self, record: Mapping[str, Any], where: str) -> None:
        """Refuse the rule of a run whose `record` with every metric it logs (`where` says whose) lacks its metric."""
        raise ConfigError(f"the run logs no metric {self.metric!r} to stop on; {where} "
                          f"{', '.join(sorted(record)) or 'nothing'}", field=FIELD)
