"""matplotlib, imported when the first plot is drawn.

A training process needs no plotting library until it writes its report, after the run's peak memory: imported at
start-up, matplotlib and pyplot cost every stage ~27 MB of resident memory (its peak RSS included) and ~0.4 s.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def pyplot() -> Any:
    """`matplotlib.pyplot`, on the Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
