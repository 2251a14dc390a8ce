"""Graceful stop on SIGINT / SIGTERM: inside the training loop, finish the current step, checkpoint and
return; anywhere else (loading, data preparation, the evaluation before training, saving), raise
`Interrupted` so the run is undone or left resumable and the command exits with a message."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM outside the training loop. A KeyboardInterrupt, so no `except Exception` in a
    library swallows it; `detail` says what is left on disk."""

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.detail = detail
        super().__init__(f"stopped by {self.signal_name}" + (f": {detail}" if detail else ""))


class StoppedInTraining(Interrupted):
    """SIGINT or SIGTERM inside the training loop: the step finished and a checkpoint was saved (the trainer
    said where, and how to resume). Raised to whoever called the stage, as any interrupted Python call raises
    a KeyboardInterrupt: a script or a notebook does not go on as if the run had finished."""

    def __init__(self, signum: int, step: int, checkpoint: str, resume_command: str) -> None:
        super().__init__(signum, f"at step {step}; checkpoint: {checkpoint}; resume with: {resume_command}")
        self.step = step
        self.checkpoint = checkpoint


@contextlib.contextmanager
def on_stop_signals(handler: Callable[[int, FrameType | None], Any]) -> Iterator[None]:
    """While active, SIGINT and SIGTERM call `handler(signum, frame)`; the previous handlers come back after.
    Inert off the main thread, where signals cannot be caught."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, earlier in previous.items():
            signal.signal(sig, earlier)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """While active, SIGINT and SIGTERM raise `Interrupted` (SIGTERM would otherwise kill the process on
    the spot, with no message and no clean-up). Inert off the main thread, where signals cannot be caught."""

    def handle(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    with on_stop_signals(handle):
        yield


class StopRequest:
    """While active, SIGINT and SIGTERM set `requested` instead of killing the process.

    A second SIGINT restores Python's default behaviour (KeyboardInterrupt), so an impatient user
    can still break out of a step that hangs. Signals can only be caught on the main thread; on other
    threads this is inert.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self.signum: int | None = None
        self.told = False  # whether the trainer said what the stop waits for
        self._handlers = contextlib.ExitStack()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        self._handlers.enter_context(on_stop_signals(self._handle))
        return self

    def __exit__(self, *exc: object) -> None:
        self._handlers.close()


def stop_when_demo_dies(pid_variable: str) -> None:
    """Have this process sent SIGTERM (finish the step, save a checkpoint, exit) when the process whose pid is in the
    environment variable `pid_variable` (the demo that started it) exits, even by SIGKILL; at once if it already
    has. Linux (5.3+): a pidfd, which the kernel makes readable when that process exits, watched by a daemon
    thread (exact, whoever this process's parent is: a stage is forked by the demo's fork server). Elsewhere
    nothing."""
    pid = os.environ.get(pid_variable)
    if not pid or not hasattr(os, "pidfd_open"):
        return
    try:
        fd = os.pidfd_open(int(pid))
    except ProcessLookupError:  # gone already
        os.kill(os.getpid(), signal.SIGTERM)
        return
    except OSError:  # a kernel without pidfds
        return

    def watch() -> None:
        select.select([fd], [], [])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="posttrain-demo-watch", daemon=True).start()
