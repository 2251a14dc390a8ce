"""Shipped recipes state only what differs from their config class's defaults.

A key that repeats its default says nothing, and it hides a later change of the default: the recipe
keeps the old value while reading as if it chose it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import yaml

from posttrain.config import load_config
from posttrain.recipes import config_class, shipped_recipes

NOT_FIELDS = ("stage", "description", "quick")


def recipe_keys(data: Mapping[str, Any], defaults: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, YAML value) of every setting: a mapping under a section is walked into; a mapping for
    a dict-typed field (such as `reward.functions`) is one value. Unknown keys are left to test_config."""
    for name, value in data.items():
        if not hasattr(defaults, str(name)):
            continue
        key = f"{prefix}{name}"
        default = getattr(defaults, str(name))
        if isinstance(value, Mapping) and dataclasses.is_dataclass(default):
            yield from recipe_keys(value, default, key + ".")
        else:
            yield key, value


def lookup(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("recipe", shipped_recipes(), ids=lambda r: r.name)
def test_recipe_sets_no_key_to_its_default(recipe):
    cls = config_class(recipe.stage)
    defaults = load_config(cls, None)
    data = yaml.safe_load(recipe.path.read_text(encoding="utf-8")) or {}
    settings = {name: value for name, value in data.items() if name not in NOT_FIELDS}
    repeated = []
    for key, value in recipe_keys(settings, defaults):
        # Compare the value as the config reads it (1e-3 and 1.0e-3, 2 and 2.0 are the same setting).
        if lookup(load_config(cls, {key: value}), key) == lookup(defaults, key):
            repeated.append(f"{key}: {value!r}")
    assert not repeated, (f"{recipe.path.name} sets keys to the {cls.__name__} default; remove them: "
                          + ", ".join(repeated))
