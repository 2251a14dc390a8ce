"""The console posttrain prints on (no torch here: `posttrain --help` imports it)."""

from __future__ import annotations

import os

from rich.console import Console

LOG_WIDTH = 200  # columns of a console that is not a terminal (a log file): rich's 80 cut the final bar lines


def run_console() -> Console:
    """The terminal's width, or `LOG_WIDTH` where output goes to a file or a pipe (where rich assumes 80 columns
    and cut the training bar's last line to "0:0… eta 0:00…"), unless COLUMNS says otherwise."""
    console = Console()
    if not console.is_terminal:
        columns = os.environ.get("COLUMNS", "")
        console.width = int(columns) if columns.isdigit() else LOG_WIDTH
    return console
