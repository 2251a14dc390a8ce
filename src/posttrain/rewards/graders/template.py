"""Grader templates: `{{ sample.output_text }}`, `{{ item.answer }}`, with answer-extraction filters.

Rendered in jinja2's sandboxed environment (no attribute access to Python internals, no imports), with
undefined names as errors: a template naming `item.anwser` or `sample.output_txt` fails at start-up
(`check_fields`, against the data's columns, before anything is sampled) or on the first row that lacks the
field, never silently renders "". A field the row has but whose value is None (a prompt-only row's `item.answer`)
is that row's error when printed or filtered, never the text "None"; `regex` arguments written in the template are
checked when it compiles.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from posttrain.rewards.graders.base import Spec
from posttrain.rewards.graders.extract import EXTRACTORS


def _no_none(value: Any) -> Any:
    """What a `{{ ... }}` prints, unless it is None: a row without a value for the field (a prompt-only row's
    `item.answer`) would print "None", and a comparison with it fail silently on every such row."""
    if value is None:
        raise ValueError("a field this template prints has no value in this row (None), e.g. item.answer of a row "
                         "without an answer")
    return value


def _text_only(name: str, extract: Any) -> Any:
    """The filter `extract`, refusing None (a field the row has no value for) with a message that says so."""

    def checked(text: Any, *args: Any) -> str:
        if text is None:
            raise ValueError(f"| {name} has no text to read: the field before it has no value in this row (None), "
                             "e.g. item.answer of a row without an answer")
        return extract(text, *args)

    return checked


_ENV = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True,
                                     finalize=_no_none)
_ENV.filters.update({name: _text_only(name, extract) for name, extract in EXTRACTORS.items()})


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
        self._tree = _ENV.parse(source)  # read by `fields` and `_regex_problems`
        for problem in _regex_problems(self._tree):
            if spec is None:
                raise ValueError(f"{problem} in {source!r}")
            raise spec.error(f"{problem} in {source!r}", key)

    def fields(self) -> set[tuple[str, str]]:
        """The (`sample` or `item`, field) pairs the template reads by name (`item.x` or `item["x"]`)."""
        found = set()
        for node in self._tree.find_all((nodes.Getattr, nodes.Getitem)):
            field = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
            if isinstance(node.node, nodes.Name) and node.node.name in ("sample", "item") and isinstance(field, str):
                found.add((node.node.name, field))
        return found

    def check_fields(self, available: Mapping[str, Collection[str]], why: Mapping[str, str] | None = None) -> None:
        """ConfigError (the grader file, line and key) for a field the records will not have; `why` says, for an
        item field, why it is missing (it has no value in any row)."""
        for root, field in sorted(self.fields()):
            if field not in available[root]:
                message = (f"{root}.{field} does not exist: {root} has {', '.join(sorted(available[root]))} "
                           f"(in {self.source!r})")
                if root == "item" and why and field in why:
                    message = f"item.{field} {why[field]} (in {self.source!r})"
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


def _regex_problems(tree: nodes.Template) -> list[str]:
    """What is wrong with the written-out arguments of the template's `| regex(pattern, group)` filters: a pattern
    that does not compile, a group it does not have. Found when the grader loads, not on the first row that
    matches, minutes into a run."""
    problems = []
    for node in tree.find_all(nodes.Filter):
        if node.name != "regex":
            continue
        given = dict(enumerate(node.args)) | {{"pattern": 0, "group": 1}[k.key]: k.value for k in node.kwargs
                                               if k.key in ("pattern", "group")}
        pattern, group = given.get(0), given.get(1)
        if not isinstance(pattern, nodes.Const) or not isinstance(pattern.value, str):
            continue
        try:
            groups = re.compile(pattern.value).groups
        except re.error as err:
            problems.append(f"| regex({pattern.value!r}): not a regular expression ({err})")
            continue
        if isinstance(group, nodes.Const) and groups and not (isinstance(group.value, int) and 0 <= group.value
                                                               <= groups):
            problems.append(f"| regex({pattern.value!r}, {group.value!r}): the pattern has groups 0 to {groups}")
    return problems


def template_field(spec: Spec, key: str) -> Template:
    return Template(spec.get(key, str), spec, key)
