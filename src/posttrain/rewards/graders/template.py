"""Grader templates: `{{ sample.output_text }}`, `{{ item.answer }}`, with answer-extraction filters.

Rendered in jinja2's sandboxed environment (no attribute access to Python internals, no imports), with
undefined names as errors: a template naming `item.anwser` or `sample.output_txt` fails at start-up
(`check_fields`, against the data's columns, before anything is sampled) or on the first row that lacks the
field, never silently renders "".
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from posttrain.rewards.graders.base import Spec
from posttrain.rewards.graders.extract import EXTRACTORS

_ENV = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
_ENV.filters.update(EXTRACTORS)


class Template:
    """A compiled template that renders with `sample` and `item` in scope."""

    def __init__(self, source: str, spec: Spec | None = None, key: str = "input") -> None:
        self.source, self.spec, self.key = source, spec, key
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as err:
            if spec is None:
                raise
            raise spec.error(f"template syntax error: {err.message} in {source!r}", key) from None

    def fields(self) -> set[tuple[str, str]]:
        """The (`sample` or `item`, field) pairs the template reads by name (`item.x` or `item["x"]`)."""
        found = set()
        for node in _ENV.parse(self.source).find_all((nodes.Getattr, nodes.Getitem)):
            field = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
            if isinstance(node.node, nodes.Name) and node.node.name in ("sample", "item") and isinstance(field, str):
                found.add((node.node.name, field))
        return found

    def check_fields(self, available: Mapping[str, Collection[str]]) -> None:
        """ConfigError (the grader file, line and key) for a field the records will not have."""
        for root, field in sorted(self.fields()):
            if field not in available[root]:
                message = (f"{root}.{field} does not exist: {root} has {', '.join(sorted(available[root]))} "
                           f"(in {self.source!r})")
                if self.spec is None:
                    raise ValueError(message)
                raise self.spec.error(message, self.key)

    def render(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> str:
        try:
            return self._template.render(sample=sample, item=item)
        except jinja2.UndefinedError as err:
            # A missing field is a wrong grader (or wrong data), not a bad sample: stop with the field named.
            message = f"{err.message} in {self.source!r}; the item has {', '.join(map(str, item)) or 'no fields'}"
            if self.spec is None:
                raise ValueError(message) from None
            raise self.spec.error(message, self.key) from None


def template_field(spec: Spec, key: str) -> Template:
    return Template(spec.get(key, str), spec, key)
