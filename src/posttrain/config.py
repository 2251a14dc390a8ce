"""Config system: one frozen dataclass per recipe, YAML recipes, dotted overrides.

Every field is declared with `param(default, doc, ...)` so that its one-line doc, its allowed values
and its range live where the field is declared (cleanrl style). `load_config` builds a config from
a YAML recipe plus `key.sub=value` overrides; anything it cannot use is a `ConfigError` that names
the key, the value, where it came from (file and line, or the override) and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from posttrain.errors import ConfigError

C = TypeVar("C")
_MISSING = dataclasses.MISSING


def param(default: Any, doc: str, *, choices: Sequence[Any] | Mapping[str, Any] | None = None,
          ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """Declare a config field with its default, a one-line doc and its allowed values or range.

    `choices` may be a mapping such as a registry of `posttrain.algos`: it is read when a value is checked,
    so a name a user registers after this declaration is accepted too.
    """
    frozen = choices if choices is None or isinstance(choices, Mapping) else tuple(choices)
    meta = {"doc": doc, "choices": frozen,
            "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(factory: Callable[[], Any], doc: str) -> Any:
    """Declare a nested config section: a dataclass (or a factory of a customised one) with a doc."""
    return dataclasses.field(default_factory=factory, metadata={"doc": doc})


# ----------------------------------------------------------------------------------------------
# Shared sections used by several recipes.


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = param("run", "Run name: the run directory is <out_dir>/<name>.")
    out_dir: str = param("runs", "Parent directory of run directories.")
    overwrite: bool = param(False, "Replace an existing run directory of the same name.")
    resume: bool = param(False, "Continue the run in an existing run directory from its last checkpoint.")
    seed: int = param(0, "Seed for python, numpy and torch RNGs.", ge=0)
    threads: int = param(2, "torch CPU threads (0 = leave torch's default).", ge=0)
    log_every: int = param(10, "On a console that is not a terminal (a log file), print a progress line every N "
                                "steps, and at least once a minute (with run.progress=true; a terminal's live bar "
                                "shows every step; metrics.jsonl records every step).",
                           ge=1)
    progress: bool = param(True, "Show a live progress bar.")
    tensorboard: bool = param(False, "Also log metrics to TensorBoard (needs the `tracking` extra).")
    wandb: bool = param(False, "Also log metrics to Weights & Biases (needs the `tracking` extra).")
    workdir: str | None = param(None, "The directory relative paths of the config (model.path, data and reward "
                                      "files, run.out_dir) are resolved against: recorded in the run's "
                                      "config.yaml when it starts (None: the current directory); `posttrain "
                                      "resume` runs there, wherever it is started from.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str | None = param(None, "Local Hugging Face model directory to start from (None: build a new "
                                   "model of `size`).")
    size: str = param("tiny", "Size of a newly built Llama-style model.", choices=("tiny", "small", "custom"))
    hidden_size: int = param(128, "Hidden size when size=custom.", ge=8)
    num_layers: int = param(4, "Transformer layers when size=custom.", ge=1)
    num_heads: int = param(4, "Attention heads when size=custom.", ge=1)
    intermediate_size: int = param(512, "FFN width when size=custom.", ge=8)
    max_position_embeddings: int = param(512, "Longest sequence a newly built model supports.", ge=16)
    trust_remote_code: bool = param(False, "Allow model code shipped with `path` to run (off: safe default).")
    dtype: str = param("auto", "Parameter dtype; auto = fp32 (the master weights; train.precision=bf16 or auto "
                               "runs the matmuls in bf16); float64 for numerical checks; float16 loads and "
                               "evaluates but does not train (no loss scaling).",
                       choices=("auto", "float64", "float32", "bfloat16", "float16"))
    disable_dropout: bool | None = param(None, "Turn every dropout of the loaded model (and of a reward model or "
                                               "critic built from it) off, so that logprobs, rewards and values "
                                               "compared across forwards agree; None: off in the stages that compare "
                                               "them (rm, dpo, kto, ppo, grpo, rft, rejection), kept in sft and "
                                               "pretrain, where it regularises; false: keep the model's own.")

    def drops_dropout(self, compares_logprobs: bool = True) -> bool:
        """Whether a stage turns the model's dropout off: `disable_dropout`, or by default whether the stage
        compares logprobs (or rewards, values) across forwards."""
        return compares_logprobs if self.disable_dropout is None else self.disable_dropout


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = param(1e-4, "Peak learning rate.", gt=0)
    weight_decay: float = param(0.0, "AdamW weight decay (not applied to biases and norms).", ge=0)
    beta1: float = param(0.9, "AdamW beta1.", ge=0, lt=1)
    beta2: float = param(0.95, "AdamW beta2.", ge=0, lt=1)
    eps: float = param(1e-8, "AdamW epsilon.", gt=0)
    schedule: str = param("cosine", "Learning-rate schedule after warm-up.",
                          choices=("constant", "linear", "cosine"))
    warmup_steps: int = param(0, "Linear warm-up: step k of the first N trains at k/N x lr.", ge=0)
    min_lr_ratio: float = param(0.1, "The lr linear/cosine decay to, as a fraction of lr, at the schedule's end (the "
                                     "step after the last: the last step trains one decay step above it, as in "
                                     "transformers' schedules).", ge=0, le=1)
    schedule_steps: int = param(0, "Length of the linear/cosine decay's schedule in optimizer steps (0: "
                                   "train.max_steps). Longer than max_steps, the run stops part-way along it with "
                                   "the learning rate of that point: the model from the middle of a longer run, "
                                   "step for step. Shorter, the lr stays at its final value after it.", ge=0)
    grad_clip: float = param(1.0, "Clip the global gradient norm to this (0 = off).", ge=0)


# ----------------------------------------------------------------------------------------------
# Building a config from YAML + overrides.


def load_config(cls: type[C], recipe: str | Path | Mapping[str, Any] | None = None,
                overrides: Sequence[str] = (), *, extra: Mapping[str, Any] | None = None) -> C:
    """Build `cls` from a recipe (YAML path or mapping), then `extra` values, then `key=value` overrides.

    Every value is type-checked against the dataclass annotation and validated against its
    declared choices or range; later sources win.
    """
    if isinstance(overrides, (str, Mapping)):  # a str would be taken for a list of one-letter overrides
        raise ConfigError(f"overrides must be a list of 'key.sub=value' strings, not a {type(overrides).__name__} "
                          "(a mapping of settings goes in the recipe argument, or as `extra`)")
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = "<defaults>"
    if isinstance(recipe, Mapping):
        data, source = dict(recipe), "<mapping>"
    elif recipe is not None:
        source = str(recipe)
        data, lines = read_yaml_with_lines(Path(recipe))
    for recipe_only in ("stage", "description", "quick"):  # what a recipe file says of itself, not settings
        data.pop(recipe_only, None)
    flat = {key: (value, source, lines.get(key)) for key, value in _flatten(data).items()}
    for key, value in (extra or {}).items():  # a recipe's `quick:` settings: named by their line of the recipe
        line = lines.get(f"quick.{key}")
        flat[key] = (value, source if line is not None else "<extra>", line)
    for item in overrides:
        key, value = parse_override(item)
        flat[key] = (value, "override", None)
    _check_renamed(cls, flat)
    return _build(cls, flat, prefix="", base=None)


def check_config_object(cfg: C) -> C:
    """`cfg` checked as `load_config` checks what it reads (a config built directly, or changed with
    `dataclasses.replace`, skipped those checks): the same settings, each coerced to its field's type; a
    ConfigError names a bad one."""
    flat = {key: (value, "<config object>", None) for key, value in _flatten(to_dict(cfg)).items()}
    return _build(type(cfg), flat, prefix="", base=None)


def _check_renamed(cls: type, flat: dict[str, tuple[Any, str, int | None]]) -> None:
    """A key a config class has renamed (its `RENAMED` mapping: old dotted key -> new one) is an error that
    names the new key, rather than an unknown key with a guess."""
    renamed: Mapping[str, str] = getattr(cls, "RENAMED", {})
    for key, (value, source, line) in flat.items():
        old = next((o for o in renamed if key == o or key.startswith(o + ".")), None)
        if old is not None:
            raise ConfigError(f"was renamed: use {renamed[old]}{key[len(old):]} instead (value {value!r})",
                              file=source, line=line, field=key)


def parse_override(item: str) -> tuple[str, str]:
    """Split `key.sub=value` into its key and its (still textual) value."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value", file="override")
    key, value = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {item!r} has an empty key", file="override")
    return key.strip(), value


def read_yaml_with_lines(path: Path, what: str = "recipe") -> tuple[dict[str, Any], dict[str, int]]:
    """Read a YAML mapping (a `what`: recipe, grader) and record the 1-based line of every dotted key, for error
    messages."""
    if not path.is_file():
        raise ConfigError(f"{what} file not found", file=str(path))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"not valid UTF-8: byte 0x{raw[err.start]:02x} (save the {what} as UTF-8)", file=str(path),
                          line=line) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: plain YAML types only
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise ConfigError(f"invalid YAML: {getattr(err, 'problem', err)}", file=str(path),
                          line=mark.line + 1 if mark else None) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"a {what} must be a YAML mapping of keys to values", file=str(path), line=1)
    lines: dict[str, int] = {}
    _record_lines(node, "", lines, str(path))
    return data, lines


class _IntFromText(int):
    """An integer YAML read from text that is not its decimal spelling (0755 is 493, 1_000, 0x1f): as a text
    setting its own spelling is gone, and str() would silently be another value."""

    text: str


class _RecipeLoader(yaml.SafeLoader):
    """The safe loader, but integers keep the text they were read from when it is not their decimal spelling."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        number = super().construct_yaml_int(node)
        if node.value.strip() == str(number):
            return number
        spelled = _IntFromText(number)
        spelled.text = node.value
        return spelled


_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _RecipeLoader.construct_yaml_int)


def _record_lines(node: yaml.Node, prefix: str, lines: dict[str, int], file: str = "<yaml>") -> None:
    """Record the line of every dotted key; a key given twice is an error, in one mapping (YAML keeps the last
    silently: `train:` twice would drop the first section's settings) or spelt both ways (`train: {max_steps: 20}`
    and `train.max_steps: 5`: one would silently win)."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        key = f"{prefix}{key_node.value}"
        line = key_node.start_mark.line + 1
        if key in lines:
            raise ConfigError(f"duplicate key: already set on line {lines[key]} (YAML would silently keep only one "
                              "of them)", file=file, line=line, field=key)
        lines[key] = line
        _record_lines(value_node, key + ".", lines, file)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if callable(key):  # a function given as a reward function's name would become its repr
            raise ConfigError(f"got the function {getattr(key, '__qualname__', key)!r} as a key: name it ("
                              "'file.py:function', 'module:function', or a name it was registered under)",
                              field=prefix.rstrip(".") or None)
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _build(cls: type[C], flat: dict[str, tuple[Any, str, int | None]], prefix: str, base: C | None) -> C:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    mine = {key: item for key, item in flat.items() if key.startswith(prefix)}
    for key, (value, source, line) in mine.items():
        head = key[len(prefix):].split(".", 1)[0]
        if head not in fields:
            close = difflib.get_close_matches(head, list(fields), n=1)
            hint = f" — did you mean '{prefix}{close[0]}'?" if close else "."
            raise ConfigError(f"unknown key (value {value!r}){hint} Allowed here: {', '.join(fields)}",
                              file=source, line=line, field=key)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = prefix + name
        if dataclasses.is_dataclass(hints[name]):
            if key in mine and mine[key][0] not in ({}, None):
                value, source, line = mine[key]
                raise ConfigError(f"is a section; set its fields ({key}.<field>=...), not {value!r}",
                                  file=source, line=line, field=key)
            default = f.default_factory() if f.default_factory is not _MISSING else None
            kwargs[name] = _build(hints[name], flat, key + ".", default)
        elif key in mine:
            value, source, line = mine[key]
            kwargs[name] = _coerce_and_check(value, hints[name], f, key, source, line)
        elif nested := {k[len(key) + 1:]: item for k, item in mine.items() if k.startswith(key + ".")}:
            # `_flatten` split a mapping value (or an override named `key.sub`) into dotted keys: a
            # dict-typed field takes them back as one mapping; any other field cannot have sub-keys.
            (sub, (value, source, line)), *_ = nested.items()
            if typing.get_origin(hints[name]) is not dict:
                raise ConfigError(f"{name} is not a section: {key}.{sub} cannot be set", file=source, line=line,
                                  field=f"{key}.{sub}")
            mapping = {sub: item[0] for sub, item in nested.items()}
            kwargs[name] = _coerce_and_check(mapping, hints[name], f, key, source, line)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _coerce_and_check(value: Any, annotation: Any, f: dataclasses.Field, key: str, source: str,
                      line: int | None) -> Any:
    try:
        result = coerce(value, annotation)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{value!r} is not a valid {_type_name(annotation)} ({err})",
                          file=source, line=line, field=key) from None
    problem = _check_allowed(result, f.metadata)
    if problem:
        raise ConfigError(f"{result!r} is not allowed: {problem}", file=source, line=line, field=key)
    return result


def coerce(value: Any, annotation: Any) -> Any:
    """Convert `value` (from YAML or a textual override) to the annotated type, or raise."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if origin in (list, tuple):
        if isinstance(value, str):
            text = value
            value = yaml.load(text, Loader=_RecipeLoader) if text.strip() else []
            if value is None and text.strip().lower() not in ("null", "~", "none"):
                value = text  # text YAML reads as a comment ("###", a stop string): the text itself
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {type(value).__name__}")
        item_type = args[0] if args else Any
        items = [coerce(v, item_type) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, str):
            value = yaml.load(value, Loader=_RecipeLoader)
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping, got {type(value).__name__}")
        key_type, value_type = args if args else (Any, Any)
        return {coerce(k, key_type): _coerce_entry(k, v, value_type) for k, v in value.items()}
    if annotation is Any:
        return value
    if annotation is bool:
        return _to_bool(value)
    if annotation is int:
        return _to_int(value)
    if annotation is float:
        return _to_float(value)
    if annotation is str:
        if isinstance(value, (dict, list)) or value is None:
            raise TypeError(f"expected text, got {type(value).__name__}")
        if isinstance(value, (bool, float)):
            # YAML read the text as a boolean (no, off, yes, on) or a number (1.10): its own text is gone, and
            # str() of it ("False", "1.1") would silently be another setting
            raise TypeError(f"expected text, got the {type(value).__name__} {value!r}, which YAML read from "
                            "unquoted text: quote it (\"off\", \"1.10\")")
        if isinstance(value, _IntFromText):
            raise TypeError(f"expected text, got the integer {int(value)}, which YAML read from the unquoted text "
                            f"{value.text!r}: quote it (\"{value.text}\")")
        return str(value)
    raise TypeError(f"unsupported config type {annotation!r}")


def _coerce_entry(key: Any, value: Any, annotation: Any) -> Any:
    """A mapping's value, an error naming its key; `{a:1}` (no space after the colon) is YAML's key "a:1" with no
    value, which the error says."""
    try:
        return coerce(value, annotation)
    except (TypeError, ValueError) as err:
        hint = (" (YAML reads `a:1` as one key with no value: write `a: 1`, with a space after the colon)"
                if value is None and ":" in str(key) else "")
        raise type(err)(f"{key!r}: {err}{hint}") from None


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
        return False
    raise ValueError("expected true or false")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("expected an integer, got a boolean")
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            number = float(text)
            if number.is_integer():
                return int(number)
    raise ValueError("expected an integer")


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("expected a number, got a boolean")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        number = float(value.strip())
    else:
        raise TypeError(f"expected a number, got {type(value).__name__}")
    if math.isnan(number):
        raise ValueError("NaN is not a usable setting")
    if math.isinf(number):  # optim.lr=inf passed `gt=0` and blew the weights up at the first step
        raise ValueError("an infinite number is not a usable setting")
    return number


def _check_allowed(value: Any, meta: Mapping[str, Any]) -> str | None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        return f"must be one of {', '.join(map(repr, choices))}"
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    bounds = (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<"))
    for name, ok, symbol in bounds:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            return f"must be {symbol} {bound}"
    return None


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


# ----------------------------------------------------------------------------------------------
# Writing a config back out.


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a config dataclass (what config.yaml holds)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """Yield (dotted key, value, doc) for every leaf field of a config, in declaration order."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from describe(value, f"{prefix}{f.name}.")
        else:
            doc = f.metadata.get("doc", "")
            allowed = f.metadata.get("choices")
            if allowed:
                doc += f" [{' | '.join(map(str, allowed))}]"
            yield f"{prefix}{f.name}", value, doc
