"""Kernel choices measured once per machine: which of two ways of computing the same thing is faster here.

Some choices cannot be read off the CPU's flags: which GEMM library trains faster (`models.onednn`), which
precision a shape's attention runs faster in (`models.cpu_attention`). The first process that needs one times
both ways on random inputs (well under a second) and keeps the answer in memory and in a per-machine file
(`cache_file()`), keyed by the CPU (model name and flags), the torch build and the thread count, which are what
the answer holds for. Every later process on the machine reads it instead of measuring again: a choice changes
a run's rounding, so a run resumed in a new process must make the same one to stay bitwise.

Two processes may need the same choice at once (the demo starts two stages together). Measuring happens under
a lock on the cache: the first process measures, alone on the cores, while the second waits and then reads its
answer, so every process, and every resume, uses one answer per machine. A file that cannot be written (a
read-only home) leaves the choice in memory only, and a new process measures again.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from posttrain.models.precision import cpu_flags, cpu_info

TIMING_REPEATS = 3
_choices: dict[str, str] = {}


def measured_choice(name: str, options: tuple[str, ...], measure: Callable[[], str]) -> str:
    """The answer of `measure()` (one of `options`) for `name` on this machine: from memory, else from the cache
    file, else measured now and stored. Measured under the cache's lock: a second process that needs the same
    choice meanwhile waits (leaving the cores to the measurement) and then reads the first one's answer."""
    key = f"{machine()}|{name}"
    if key not in _choices:
        stored = _read_cache().get(key)
        if stored not in options:
            with _locked():
                cache = _read_cache()
                stored = cache.get(key)
                if stored not in options:
                    stored = measure()
                    _write_cache({**cache, key: stored})
        _choices[key] = stored
    return _choices[key]


def best_seconds(runs: Mapping[Any, Callable[[], object]], repeats: int = TIMING_REPEATS) -> dict[Any, float]:
    """The fastest of `repeats` timed calls of each way of computing a thing, after an untimed first call each
    (it warms the kernels up). The ways take turns in every round, so a slow moment of the machine hits them all."""
    times: dict[Any, list[float]] = {way: [] for way in runs}
    for _ in range(repeats + 1):
        for way, run in runs.items():
            start = time.perf_counter()
            run()
            times[way].append(time.perf_counter() - start)
    return {way: min(seconds[1:]) for way, seconds in times.items()}


def machine() -> str:
    """This CPU, torch build and thread count: what a measured choice holds for."""
    return f"{_cpu()}|torch {torch.__version__}|{torch.get_num_threads()}"


@functools.cache
def _cpu() -> str:
    """The CPU's model name and a digest of its flags (computed once: the key is looked up at every attention)."""
    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
    return f"{cpu_info().get('model name', 'unknown cpu')}|{flags}"


def cache_file() -> Path:
    """Where measured choices are kept: `$POSTTRAIN_CACHE_DIR`, else `$XDG_CACHE_HOME/posttrain`, else
    `~/.cache/posttrain`."""
    base = os.environ.get("POSTTRAIN_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "posttrain"
    return Path(base) / "kernel_choices.json"


def _read_cache() -> dict[str, str]:
    try:
        stored = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in stored.items() if isinstance(v, str)} if isinstance(stored, dict) else {}


def _write_cache(choices: dict[str, str]) -> None:
    """Write atomically (a reader never sees half a file); a cache that cannot be written is only kept in memory."""
    path = cache_file()
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        partial.write_text(json.dumps(choices, indent=1, sort_keys=True))
        os.replace(partial, path)
    except OSError:
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass


@contextmanager
def _locked() -> Iterator[None]:
    """The cache's lock file held; no lock where it cannot be opened (then the file cannot be written either).
    Opened read-only: `flock` needs no write access, so a lock file another user created still serves."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(path.with_name(f".{path.name}.lock"), os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (NFS without a lock daemon: ENOLCK; Lustre: ENOSYS)
            pass  # measure unlocked: at worst two processes measure the same choice and write it twice
        yield
    finally:
        os.close(lock)  # releases the lock
