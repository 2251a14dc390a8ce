"""Load rows from any source into a `datasets.Dataset` of canonical columns, validating as they are read.

Sources: .jsonl, .json, .parquet, .csv, a `datasets` directory (`save_to_disk`), a built-in task
name, or a Python iterable of dicts. Text files are read and validated line by line here — not by
`datasets`' own JSON/CSV builders — because those report a malformed row as a pyarrow stack trace
with no line number. The validated, normalised rows are then written once by
`Dataset.from_generator` to an Arrow file (memory-mapped, cached under a fingerprint of the file's
path, size and mtime and of the settings), so a second run over the same file starts instantly and
later `map` calls are cached too.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import difflib
import hashlib
import io
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict
from datasets.exceptions import DatasetGenerationError

from posttrain.data import schemas, tasks
from posttrain.data.config import FORMATS, DataConfig
from posttrain.data.schemas import FEATURES, SPECS, STRUCTURED_FIELDS, Where, detect_format, normalise_row
from posttrain.errors import ConfigError, DataError

SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")
# Bump when the canonical form changes, so stale Arrow caches are not reused (`code_digest` covers the code too).
_CACHE_VERSION = "5"


def code_digest(*files: str) -> str:
    """A digest of these source files (a module's `__file__`): part of a cache's key, so that a posttrain whose
    reading or tokenising of rows changed never serves the rows an older one cached (an upgrade in place, an edit
    of a checkout)."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(Path(file).read_bytes())
    return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Rows:
    """Validated rows in canonical form (`schemas.FEATURES[format]`) and where they came from."""

    dataset: Dataset
    format: str
    name: str


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything needed to (re-)read a source: picklable, and hashed into the cache fingerprint."""

    kind: str  # jsonl | json | csv | parquet | disk | task
    name: str
    format: str
    renames: tuple[tuple[str, str], ...]
    limit: int
    split: str
    size: int
    seed: int
    imitates: bool = False  # the stage trains towards every completion (`schemas.normalise_row`)


def load_rows(cfg: DataConfig, accepts: Sequence[str] = FORMATS,
              rows: Iterable[Mapping[str, Any]] | None = None, imitates: bool = False) -> Rows:
    """Read `cfg.source` (or the in-memory `rows`) as one of the `accepts` formats. `imitates`: the stage trains
    towards every completion it is given (SFT: `config.IMITATING_STAGES`), which refuses rows labelled undesirable.

    Raises DataError (naming file, line and field) for a missing or unreadable source, a row that
    does not fit the format, or a source with no rows at all.
    """
    if cfg.format != "auto" and cfg.format not in accepts:
        raise ConfigError(f"{cfg.format!r} is not a format this stage takes: use one of {', '.join(accepts)}",
                          field="data.format")
    if rows is not None:
        return _load_iterable(rows, cfg, accepts, imitates)
    spec = _spec(cfg, imitates)
    fmt = _choose_format(spec, accepts)
    spec = dataclasses.replace(spec, format=fmt)
    try:
        dataset = Dataset.from_generator(_generate, features=FEATURES[fmt], gen_kwargs={"spec": spec},
                                         cache_dir=cfg.cache_dir, fingerprint=_fingerprint(spec))
    except DatasetGenerationError as err:
        if isinstance(err.__cause__, DataError):
            raise err.__cause__ from None
        raise
    except OSError as err:  # the cache directory: a file, not writable, on a read-only disk (the rows' own are above)
        import datasets

        where = cfg.cache_dir or f"{datasets.config.HF_DATASETS_CACHE} (HF_DATASETS_CACHE)"
        raise ConfigError(f"the data cache {where} cannot be used ({err.strerror or err}): set data.cache_dir to a "
                          "writable directory", field="data.cache_dir") from None
    return Rows(dataset=dataset, format=fmt, name=f"task:{spec.name}" if spec.kind == "task" else spec.name)


def source_format(cfg: DataConfig, accepts: Sequence[str] = FORMATS) -> str:
    """The format `load_rows(cfg, accepts)` reads `cfg.source` as, from its first row's columns (a DataError as
    load_rows raises it where none fits), without reading the rest."""
    return _choose_format(_spec(cfg), accepts)


def _spec(cfg: DataConfig, imitates: bool = False) -> _Spec:
    kind, name = _resolve(cfg.source)
    if kind == "task" and cfg.split not in tasks.SPLITS:
        raise ConfigError(f"a built-in task's split is one of {', '.join(tasks.SPLITS)}, not {cfg.split!r}",
                          field="data.split")
    # data.size and data.seed choose a built-in task's rows and data.split a task's or a `datasets` directory's:
    # left out of a file's spec, whose cache key they changed (the same file read and tokenised again by each
    # recipe of another data.size, or for another data.seed's held-out draw, which is taken later).
    task = kind == "task"
    return _Spec(kind=kind, name=name, format=cfg.format, renames=tuple(sorted(cfg.columns.renames().items())),
                 limit=cfg.limit, split=cfg.split if task or kind == "disk" else "", size=cfg.size if task else 0,
                 seed=cfg.seed if task else 0, imitates=imitates)


def _resolve(source: str) -> tuple[str, str]:
    """The kind of a source string: a file by suffix, a `datasets` directory, or a task name."""
    path = Path(source).expanduser()
    if path.is_dir():
        return "disk", str(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in SUFFIXES:
            raise DataError(f"unsupported file type {suffix or '(none)'!r}: use one of {', '.join(SUFFIXES)}, "
                            "or a `datasets` directory", file=str(path))
        return {".ndjson": "jsonl"}.get(suffix, suffix[1:]), str(path)
    if source in tasks.TASKS:
        return "task", source
    hint = ""
    if path.suffix == "" and "/" not in source:
        close = difflib.get_close_matches(source, list(tasks.TASKS), n=1)
        hint = f" — did you mean the built-in task {close[0]!r}?" if close else (
            f" (built-in tasks: {', '.join(tasks.TASKS)})")
    raise DataError(f"file not found{hint}", file=source)


def _choose_format(spec: _Spec, accepts: Sequence[str]) -> str:
    if spec.kind == "task":
        task = tasks.get_task(spec.name)
        wanted = [spec.format] if spec.format != "auto" else list(accepts)
        for fmt in wanted:
            if fmt in task.formats:
                return fmt
        raise DataError(f"task {spec.name!r} yields {', '.join(task.formats)}, not {' or '.join(wanted)}",
                        file=f"task:{spec.name}", field="format")
    first = next(_renamed(_read(spec), spec), None)
    if first is None:
        raise DataError("empty file: no rows", file=spec.name)
    where, row = first
    if not isinstance(row, Mapping):
        raise where.error(f"a row must be an object of columns, got {type(row).__name__}")
    if spec.format != "auto":
        return spec.format
    return detect_format(list(row), accepts, where)


def _generate(spec: _Spec) -> Iterator[dict[str, Any]]:
    """Canonical rows of a source (runs inside `Dataset.from_generator`)."""
    if spec.kind == "task":
        task = tasks.get_task(spec.name)
        rows = task.rows(spec.format, split=spec.split, size=spec.size, seed=spec.seed)
        for i, row in enumerate(rows, start=1):
            yield normalise_row(row, spec.format, Where(f"task:{spec.name}", i))
        return
    for where, row in _renamed(_read(spec), spec):
        yield _storable(normalise_row(row, spec.format, where, spec.imitates), where)


def _storable(row: dict[str, Any], where: Where) -> dict[str, Any]:
    """`row`, whose text Arrow can store as UTF-8: a lone surrogate (JSON's "\\ud800" escape, unpaired) cannot be,
    and failed deep inside `datasets` with a traceback that named no row."""
    for field, value in row.items():
        for text in _texts(value):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise where.error(f"not valid Unicode text: {err.reason} ({err.object[err.start:err.end]!r} at "
                                  f"character {err.start}, e.g. an unpaired \\ud800-\\udfff escape in JSON)",
                                  field=field) from None
    return row


def _texts(value: Any) -> Iterator[str]:
    """Every string in `value` (a column's value: text, or messages, steps, tools nested in lists and mappings)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _texts(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _texts(item)


def _renamed(raw: Iterator[tuple[Where, Any]], spec: _Spec) -> Iterator[tuple[Where, Any]]:
    """Apply column renames (source name -> canonical name) and the row limit."""
    renames = dict(spec.renames)
    required = set(SPECS[spec.format].required) if spec.format in SPECS else set()
    limited = itertools.islice(raw, spec.limit) if spec.limit else raw
    first = True
    for where, row in limited:
        if isinstance(row, Mapping) and renames:
            # The first row must have every renamed column; a later one every renamed column its format requires
            # (one without it was reported as lacking the canonical name, with a hint to rename another column).
            # An optional one (margin, answer, steps...) may be missing from some rows, as unrenamed.
            for source_name, canonical in renames.items():
                if source_name not in row and (first or canonical in required):
                    close = difflib.get_close_matches(source_name, list(row), n=1)
                    hint = f" — did you mean {close[0]!r}?" if close else ""
                    raise where.error(f"column {source_name!r} (to use as {canonical!r}) is not in this row{hint} "
                                      f"Columns: {', '.join(row)}", field=f"columns.{canonical}")
            row = {k: v for k, v in row.items() if k not in renames.values()} | {
                renames[k]: v for k, v in row.items() if k in renames}
        first = False
        yield where, row


_CODE = code_digest(__file__, schemas.__file__)  # read once, not at every load


def _fingerprint(spec: _Spec) -> str:
    identity = [_CACHE_VERSION, _CODE, repr(spec)]
    if spec.kind == "task":
        # What the generator writes, not only its name and seed: a task whose rows changed (a new posttrain
        # version, a user's own edit) must not be served the old rows from the cache. The first rows alone can
        # miss a change of the task's settings (a share of worked answers that only some rows show): those too.
        task = tasks.get_task(spec.name)
        identity.append(repr(sorted(vars(task).items())))
        identity.append(repr(list(task.rows(spec.format, spec.split, size=4, seed=spec.seed))))
    else:
        # The file itself, not only its name, size and time: `cp -p`, `rsync -t` or `tar x` write new contents of
        # the same size and mtime, and a relative name is another file in another directory. A new file or an edit
        # has a new inode or a new ctime (which no tool sets back).
        path = Path(spec.name).resolve()
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                stat = f.stat()
                identity.append(f"{f}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_dev}:{stat.st_ino}")
    return hashlib.sha256("\n".join(identity).encode()).hexdigest()[:32]


def _load_iterable(rows: Iterable[Mapping[str, Any]], cfg: DataConfig, accepts: Sequence[str],
                   imitates: bool) -> Rows:
    spec = _Spec(kind="rows", name="<rows>", format=cfg.format, renames=tuple(sorted(cfg.columns.renames().items())),
                 limit=cfg.limit, split=cfg.split, size=cfg.size, seed=cfg.seed)
    located = _renamed(((Where("<rows>", i), row) for i, row in enumerate(rows, start=1)), spec)
    first = next(located, None)
    if first is None:
        raise DataError("no rows", file="<rows>")
    where, row = first
    if not isinstance(row, Mapping):
        raise where.error(f"a row must be a dict of columns, got {type(row).__name__}")
    fmt = cfg.format if cfg.format != "auto" else detect_format(list(row), accepts, where)
    canonical = [normalise_row(r, fmt, w, imitates) for w, r in itertools.chain([first], located)]
    return Rows(dataset=Dataset.from_list(canonical, features=FEATURES[fmt]), format=fmt, name="<rows>")


# ----------------------------------------------------------------------------------------------
# Readers: each yields (where, raw row) with the row's line (text files) or 1-based row number.


def _read(spec: _Spec) -> Iterator[tuple[Where, Any]]:
    return {"jsonl": _read_jsonl, "json": _read_json, "csv": lambda name: _read_csv(name, dict(spec.renames)),
            "parquet": _read_parquet, "disk": lambda name: _read_disk(name, spec.split)}[spec.kind](spec.name)


def _read_jsonl(name: str) -> Iterator[tuple[Where, Any]]:
    with open(name, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = Where(name, number)
            text = _decode(raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw, where)
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as err:
                # Lines ended by CR alone (classic Mac OS, some exports) read as one line of several rows.
                lone_cr = err.msg == "Extra data" and "\r" in text.rstrip("\r\n")
                hint = ": its lines end with CR alone; convert them to LF (or CRLF)" if lone_cr else ""
                raise where.error(f"invalid JSON: {err.msg} (column {err.colno}){hint}") from None


def _read_json(name: str) -> Iterator[tuple[Where, Any]]:
    data = Path(name).read_bytes()
    text = _decode_all(data, name)
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON Lines in a .json file
            yield from _read_jsonl(name)
            return
        raise DataError(f"invalid JSON: {err.msg} (column {err.colno})", file=name, line=err.lineno) from None
    if isinstance(parsed, dict):  # one row, or a mapping of splits: which, the file does not say
        raise DataError("a .json file holds a list of rows ([{...}, ...]) or JSON Lines (one row per line); this "
                        "one is a single object: put its rows in a list, or name it .jsonl", file=name, line=1)
    if not isinstance(parsed, list):
        raise DataError(f"a .json file must hold a list of rows (or one row per line), got "
                        f"{type(parsed).__name__}", file=name, line=1)
    yield from zip(_item_lines(text, name), parsed, strict=True)


def _item_lines(text: str, name: str) -> Iterator[Where]:
    """The line on which each item of a top-level JSON list starts (the list is already known valid)."""
    decoder = json.JSONDecoder()
    index, line = text.index("[") + 1, 1 + text.count("\n", 0, text.index("["))
    while True:
        start = index
        while text[index] in " \t\r\n,":
            index += 1
        if text[index] == "]":
            return
        line += text.count("\n", start, index)
        yield Where(name, line)
        _, end = decoder.raw_decode(text, index)
        line += text.count("\n", index, end)
        index = end


def _read_csv(name: str, renames: Mapping[str, str]) -> Iterator[tuple[Where, Any]]:
    """Rows of a CSV file, each at the line where its record starts (a quoted cell may hold line breaks); the cells
    of structured columns (`renames` gives the canonical name of a renamed one) read as JSON."""
    text = _decode_all(Path(name).read_bytes(), name)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            breaks = sum(v.count("\n") for v in row.values() if isinstance(v, str))
            where = Where(name, reader.line_num - breaks)
            if None in row:
                raise where.error(f"{len(row[None])} more cells than the header has columns")
            yield where, {key: _csv_cell(renames.get(key, key), value, where) for key, value in row.items()}
    except csv.Error as err:
        raise DataError(f"invalid CSV: {err}", file=name, line=reader.line_num) from None


# Columns that hold text or a conversation (a list of messages).
MESSAGE_FIELDS = ("prompt", "completion", "chosen", "rejected")


def _csv_cell(key: str, value: str | None, where: Where) -> Any:
    """CSV cells are text; lists and numbers are read from their JSON spelling (true/false in any case, as
    pandas and spreadsheets write them), empty cells as null. `key`: the column's canonical name."""
    if value is None or value == "":
        return None
    if key in MESSAGE_FIELDS and value.lstrip().startswith("[{"):
        # A conversation written as JSON (as `messages` cells are): a list of {"role", "content"} turns is read as
        # one, not trained on as the literal text of a single turn
        with contextlib.suppress(json.JSONDecodeError):
            turns = json.loads(value)
            if isinstance(turns, list) and turns and all(isinstance(t, dict) and "role" in t for t in turns):
                return turns
    if key not in STRUCTURED_FIELDS:
        return value
    if value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise where.error(f"expected JSON (a list or a number) in this CSV cell, got {value[:40]!r}",
                          field=key) from None


def _read_parquet(name: str) -> Iterator[tuple[Where, Any]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(name).iter_batches(batch_size=1024)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield Where(name, number), row
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(f"not a readable parquet file: {err}", file=name) from None


def _read_disk(name: str, split: str) -> Iterator[tuple[Where, Any]]:
    try:
        loaded = datasets.load_from_disk(name)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"not a `datasets` directory (save_to_disk): {err}", file=name) from None
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            first = next(iter(loaded), None)  # save_to_disk writes each split as a directory of its own, a source too
            if first is None:
                raise DataError("a DatasetDict with no split", file=name)
            raise DataError(f"no split {split!r}; the directory has {', '.join(loaded)}: choose one with data.split, "
                            f"or name its own directory ({Path(name) / first})", file=name, field="data.split")
        loaded = loaded[split]
    for number, row in enumerate(loaded, start=1):
        yield Where(name, number), row


def _decode(raw: bytes, where: Where) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise where.error(f"not valid UTF-8: byte 0x{raw[err.start]:02x} at column {err.start + 1}") from None


def _decode_all(data: bytes, name: str) -> str:
    data = data.removeprefix(codecs.BOM_UTF8)  # spreadsheets' "CSV UTF-8" starts with one
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"not valid UTF-8: byte 0x{data[err.start]:02x} at column {column}", file=name,
                        line=line) from None
