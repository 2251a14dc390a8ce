"""Seeding and thread settings applied at the start of every run."""

from __future__ import annotations

import random

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
