"""Graceful stop on SIGINT / SIGTERM: finish the current step, checkpoint, exit cleanly."""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopRequest:
    """While active, SIGINT and SIGTERM set `requested` instead of killing the process.

    A second SIGINT restores Python's default behaviour (KeyboardInterrupt), so an impatient user
    can still break out of a step that hangs. Signals can only be caught on the main thread; on other
    threads this is inert.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
