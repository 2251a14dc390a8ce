"""glibc's malloc told to keep freed memory for reuse: one setting for the process, made when training starts.

Why: glibc serves an allocation above its mmap threshold (128 KiB at first, then rising with the largest block
freed, up to 32 MiB) with freshly mapped pages, and hands a freed heap top back to the OS once more than twice
that threshold is free. A training step allocates and frees the same large temporaries over and over (attention
scores, activations, their gradients), so the step keeps paying the kernel to map and zero pages it just gave
back. With these thresholds, the GEMM attention's forward + backward at 2 x 8 x 256^2 scores took 3.6-4.1 ms a call
after its first two, against 4.0-15.1 ms by default (Zen 5 EPYC, bf16). The reward model's benchmark step, runs with
and without this alternated three times: bf16 0.201, 0.200, 0.194 -> 0.187, 0.197, 0.180 s, fp32 0.289, 0.313,
0.304 -> 0.273, 0.300, 0.293 s, peak RSS within 3% either way; GRPO's level (benchmarks/README.md, thirteenth
session).

What it costs: memory freed below the heap's top stays with the process (up to `TRIM_THRESHOLD`) instead of going
back to the OS, so a run's resident memory stays near its peak between peaks. The peak itself is what the run
needs anyway.

`keep_freed_memory()` does it once per process, from the Trainer: only where the C library is glibc, no other
malloc is preloaded (`LD_PRELOAD` naming one: tcmalloc, jemalloc, mimalloc) and the user has not set glibc's own
malloc settings (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `glibc.malloc` tunables), which win.
`POSTTRAIN_MALLOC_TUNING=0` leaves malloc as it is. The settings are not undone after a run: glibc cannot report the
values it had, and they change no result, only where freed memory goes. Evaluation before the Trainer exists, and a
process that only samples or evaluates, keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # where glibc's moving threshold stops rising on 64-bit; larger blocks are still mapped
TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap's top before any goes back to the OS
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _user_decides() -> bool:
    """Whether the user chose malloc's settings, or another malloc, for this process."""
    return (any(os.environ.get(name) for name in USER_SETTINGS)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
            or "malloc" in os.environ.get("LD_PRELOAD", "").lower())  # tcmalloc, jemalloc, mimalloc


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap threshold to `MMAP_THRESHOLD` (no longer moving) and its trim threshold to `TRIM_THRESHOLD`,
    once per process; whether it did (see the module's docstring for where it does not)."""
    if os.environ.get("POSTTRAIN_MALLOC_TUNING", "1") == "0" or platform.libc_ver()[0] != "glibc" or _user_decides():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # both calls made whatever the first answers (1 where glibc took the value)
    answers = (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all(answers)
