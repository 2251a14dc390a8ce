"""matplotlib, imported when the first plot is drawn, and how every plot is saved.

A training process needs no plotting library until it writes its report, after the run's peak memory: imported at
start-up, matplotlib costs every stage ~27 MB of resident memory (its peak RSS included) and ~0.4 s.

Figures are `matplotlib.figure.Figure`s made directly, not through pyplot: nothing is registered in pyplot's global
figure manager (no figure to close, none kept alive by an error between drawing and saving), and saving picks the
Agg canvas by the file's format, so no display backend is ever involved (servers, CI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DPI = 110
# zlib level 1 rather than Pillow's default 6: a report's PNG is larger (a 5-panel curves figure 201 KB, 171 KB at
# level 6 with the earlier layout) and encoded sooner (level 6 took ~80 ms a figure under cProfile), at the end of
# every run.
PNG_COMPRESSION = 1


def new_figure(width: float, height: float) -> Any:
    """An empty figure of `width` x `height` inches, without a layout engine whatever the user's matplotlibrc says
    (`figure.autolayout`, `figure.constrained_layout.use`): its axes stay where the caller or `save_png` puts them."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="none")


def save_png(fig: Any, out: Path, *, fit: bool = True) -> Path:
    """Write `fig` to `out` as a PNG (its directory made). `fit`: first move the axes so that every label fits
    (`Figure.tight_layout`, which draws the figure once more to measure them), with room kept for a suptitle."""
    if fit:
        fig.tight_layout(rect=(0, 0, 1, 0.97) if fig.get_suptitle() else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=DPI, pil_kwargs={"compress_level": PNG_COMPRESSION})
    return out
