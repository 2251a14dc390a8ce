"""metrics.jsonl: one JSON object per logged step, appended and flushed as training goes."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

from posttrain.errors import DataError
from posttrain.train.dist import is_main_process


def finite_json(value: Any, **options: Any) -> str:
    """`json.dumps` of `value` with every float that is not finite written as null: bare NaN and Infinity, what
    `json.dumps` writes by default, are not JSON, and strict readers (jq, JavaScript, many languages') refuse the
    whole file."""
    def clean(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: clean(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v) for v in item]
        return item

    return json.dumps(clean(value), allow_nan=False, **options)


class MetricsWriter:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._file.write(finite_json(record) + "\n")
            self._file.flush()
        except OSError as err:  # a full disk: named, as what the user would free space for
            raise OSError(err.errno, err.strerror, str(self.path)) from err

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A last line without its newline that is not JSON is a record a crash
    cut short while it was written: it is dropped. Any other line that is not a JSON object is an error."""
    path = Path(path)
    with path.open(encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the text after the last newline
                continue
            record = None
        if not isinstance(record, dict):
            raise DataError("not a JSON object (a damaged metrics file)", file=str(path), line=number)
        records.append(record)
    return records


def truncate_metrics(path: str | Path, last_step: int) -> list[dict[str, Any]]:
    """Drop records logged after `last_step` (a resumed run re-logs them from its checkpoint), and a partial
    last line; return the records kept. The file is replaced atomically: a crash here leaves the old one,
    never a half-written one."""
    path = Path(path)
    if not path.is_file():
        return []
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    _replace_jsonl(path, kept)
    return kept


def truncate_samples(path: str | Path, last_step: int) -> None:
    """samples.jsonl of a resumed run: drop the samples of steps after `last_step` (sampled again from the
    checkpoint) and the step-0 samples the resumed process appended again after later steps (its evaluation of
    the starting model, already recorded by the first process), so no step's samples appear twice."""
    path = Path(path)
    if not path.is_file():
        return
    kept, later = [], False
    for record in read_metrics(path):
        step = record.get("step", 0)
        if step > last_step or (step == 0 and later):
            continue
        later = later or step > 0
        kept.append(record)
    _replace_jsonl(path, kept)


def _replace_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write `records` over `path` atomically: a crash here leaves the old file, never a half-written one."""
    replace_text(path, "".join(json.dumps(r) + "\n" for r in records))


def replace_text(path: Path, text: str) -> None:
    """Write `text` over `path` atomically and durably: a crash or a full disk leaves the old file (or none), never
    a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # on a read-only directory this fails too, and would hide the cause
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename in (None, str(tmp)):  # named as the file the user knows (a
            raise OSError(err.errno, err.strerror, str(path)) from err      # write, flush or fsync names none)
        raise


def write_json(path: str | Path, record: dict[str, Any]) -> None:
    """Write one JSON document over `path` atomically; under torchrun only rank 0 writes."""
    if is_main_process():
        replace_text(Path(path), json.dumps(record))


def append_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Append rows to a JSONL file; under torchrun only rank 0 writes (its own rows). A last line a crash cut short
    (no newline) is dropped first: appended to, it would become a damaged line in the middle of the file."""
    if not is_main_process():
        return
    path = Path(path)
    _drop_torn_tail(path)
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _drop_torn_tail(path: Path) -> None:
    """Cut `path` back to its last newline when it does not end with one."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("r+b") as f:
        f.seek(-1, 2)
        if f.read(1) == b"\n":
            return
        size, chunk = f.tell(), 1 << 16
        while True:  # the last newline, reading backwards a chunk at a time
            start = max(0, size - chunk)
            f.seek(start)
            newline = f.read(size - start).rfind(b"\n")
            if newline >= 0 or start == 0:
                f.truncate(start + newline + 1 if newline >= 0 else 0)
                return
            size = start
