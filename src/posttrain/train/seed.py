"""Seeding and thread settings applied at the start of every run."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int) -> None:
    """Pin torch to `threads` CPU threads (0 leaves torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def threads_for(threads: int) -> Iterator[None]:
    """torch on `threads` CPU threads (0: as it is) for the block, and as it was after."""
    before = torch.get_num_threads()
    set_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
