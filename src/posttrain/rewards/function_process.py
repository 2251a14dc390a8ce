"""A user's reward function named by import path, run in a child process with a hard time limit per call.

The child (this file run by its path, `python function_process.py <reply fd> <import path> <trainer pid>`; never
imported by it) imports the function once and scores one batch per request. A function that hangs, crashes the
interpreter or runs out of memory takes only the child down: the trainer waits at most `timeout_s` for each call,
then kills the child's process group (the child and whatever it started). Either way the call's rows score 0
with an error record each, as for any error of a reward function (`WeightedRewards`, `error_log`), and the next
call starts a fresh child. A batch of more than `MAX_ROWS` completions is sent in parts of that size, each with
its own limit, so that scoring a whole data set (offline RFT) is not one call.

The child runs as the trainer's user, with its environment, working directory and import path: it may read files
and call services as the function would inside the trainer. It is not locked down: the `python` grader's sandbox
(`rewards.graders.python_grader`) is the place for code that must not write files or reach the network. It dies
with the trainer (PR_SET_PDEATHSIG), also when the trainer is SIGKILLed mid-call.

Protocol: one JSON request per line on the child's stdin (`{"id", "batch"}`), one JSON reply per request on a
pipe of its own (`{"id", "scores"}` or `{"id", "error"}`; the first, id "import", says whether the function
imported). The child's fd 1 is its fd 2 (the trainer's stderr), so nothing the function prints reads as a score.
Scores come back as the function returned them (a list, nested or not; an array or tensor as its list), for the
trainer to check as it checks an in-process function's.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import importlib.util
import json
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from posttrain.rewards.user_functions import Completions

DEFAULT_TIMEOUT_S = 600.0
MAX_ROWS = 512  # completions per call of the function: a larger batch is sent in parts, each with its own limit
ALIVE_CHECK_S = 0.25  # how often a wait checks the child itself: what it started may hold the reply pipe open
SYS_PATH_VARIABLE = "POSTTRAIN_REWARD_SYS_PATH"  # the trainer's import path (JSON), which the child takes on
IMPORT_ID = "import"
PR_SET_PDEATHSIG = 1


class RewardFunctionError(Exception):
    """The user's function raised in the child process; the message is the child's traceback."""


class ChildExited(RuntimeError):
    """The child process died (a crash, out of memory, os._exit) before it replied."""


class UserFunctionProcess:
    """`fn(batch) -> scores` for the function at `path` (`package.module:function` or `file.py:function`), run in
    a child process. `start()` (also called by the first batch) raises ValueError when the function cannot be
    imported within `timeout_s`."""

    def __init__(self, path: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"reward.timeout_s must be a finite number of seconds > 0, got {timeout_s}")
        self.path, self.timeout_s = path, float(timeout_s)
        self.__name__ = path.rpartition(":")[2]
        self._process: subprocess.Popen | None = None
        self._replies = -1  # read end of the reply pipe
        self._pending = b""
        self._calls = 0
        self._owner = os.getpid()  # a forked copy of this object must not use (or kill) its creator's child
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self._start()

    def __call__(self, batch: Completions) -> Any:
        with self._lock:
            if len(batch) <= MAX_ROWS:
                return self._score(batch)
            scores: list[Any] = []
            for begin in range(0, len(batch), MAX_ROWS):
                part = self._score(_rows(batch, begin, begin + MAX_ROWS))
                scores.extend(part if isinstance(part, list) else [part])
            return scores

    def _start(self) -> None:
        if self._owner != os.getpid():  # inherited through fork: the child belongs to the process that started it
            self._process, self._replies, self._owner = None, -1, os.getpid()
        if self._process is not None and self._process.poll() is None:
            return
        self.close()
        replies, write_end = os.pipe()
        environment = {**os.environ, SYS_PATH_VARIABLE: json.dumps(sys.path)}
        command = [sys.executable, str(Path(__file__).resolve()), str(write_end), self.path, str(os.getpid())]
        try:
            # A session of its own: a timeout kills the child's process group, never the trainer's.
            self._process = subprocess.Popen(command, stdin=subprocess.PIPE, bufsize=0, pass_fds=(write_end,),
                                             env=environment, start_new_session=True)
        except BaseException:
            os.close(replies)
            raise
        finally:
            os.close(write_end)
        self._replies, self._pending = replies, b""
        try:
            reply = self._reply(IMPORT_ID, "import it")
        except (TimeoutError, ChildExited) as err:  # a start-up fault: one error naming the function
            self.close()
            raise ValueError(str(err)) from None
        except BaseException:
            self.close()
            raise
        if "error" in reply:
            self.close()
            raise ValueError(reply["error"])

    def _score(self, batch: Completions) -> Any:
        self._start()
        self._calls += 1
        try:
            self._send({"id": self._calls, "batch": dataclasses.asdict(batch)})
            reply = self._reply(self._calls, f"score a batch of {len(batch)}")
        except BaseException:  # a timeout, a crash, Ctrl-C: the child's state is unknown; the next call starts anew
            self.close()
            raise
        if "error" in reply:
            raise RewardFunctionError(reply["error"])
        return reply["scores"]

    def _send(self, request: dict[str, Any]) -> None:
        data = memoryview((json.dumps(request, default=_jsonable) + "\n").encode())
        while data:  # the child reads its stdin whenever it is not scoring, so this never waits for long
            try:
                data = data[os.write(self._process.stdin.fileno(), data):]
            except BrokenPipeError:
                raise self._exited("read its batch") from None

    def _reply(self, request_id: int | str, doing: str) -> dict[str, Any]:
        """The child's reply to `request_id`, waited for at most `timeout_s`."""
        deadline = time.monotonic() + self.timeout_s
        poller = select.poll()  # not select.select: it fails on descriptors >= 1024
        poller.register(self._replies, select.POLLIN)
        while True:
            line, newline, rest = self._pending.partition(b"\n")
            if newline:
                self._pending = rest
                reply = json.loads(line)
                if reply.get("id") == request_id:
                    return reply
                continue  # never: a call given up on closes the child with its pending replies
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"reward function {self.path} did not {doing} within {self.timeout_s:g} s "
                                   f"(reward.timeout_s): its process was killed")
            if poller.poll(1000 * min(left, ALIVE_CHECK_S)):
                chunk = os.read(self._replies, 1 << 16)
                if not chunk:
                    raise self._exited(doing)
                self._pending += chunk
            elif self._process.poll() is not None:  # dead, while something it started keeps the pipe open
                raise self._exited(doing)

    def _exited(self, doing: str) -> ChildExited:
        code = self._process.wait()
        how = (f"was killed by {signal.Signals(-code).name}{' (out of memory?)' if code == -signal.SIGKILL else ''}"
               if code < 0 else f"exited with code {code}")
        return ChildExited(f"the process of reward function {self.path} {how} when it was to {doing} "
                           f"(its output is in the log)")

    def close(self) -> None:
        """Kill the child and everything it started (if any), and release its pipes; the next call starts anew."""
        process, self._process = self._process, None
        if process is not None and self._owner == os.getpid():
            try:  # before the child is reaped: its pid, the group's id, cannot be reused until then
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
            try:
                process.stdin.close()
            except OSError:
                pass
        if self._replies >= 0:
            os.close(self._replies)
            self._replies = -1


_processes: dict[tuple[Any, ...], UserFunctionProcess] = {}


def user_function_process(path: str, timeout_s: float) -> UserFunctionProcess:
    """The function at `path` in a started child process, one per function, limit, working directory and import
    path in this process (the start-up check's is the run's). ValueError: it does not import within `timeout_s`."""
    key = (path, timeout_s, os.getcwd(), tuple(sys.path), os.getpid())
    process = _processes.get(key)
    if process is None:
        process = UserFunctionProcess(path, timeout_s)
        process.start()
        _processes[key] = process
    return process


@atexit.register
def close_user_function_processes() -> None:
    """Kill every child this process started (at exit; a recipe may call it when its run ends)."""
    for process in _processes.values():
        process.close()
    _processes.clear()


def _rows(batch: Completions, begin: int, end: int) -> Completions:
    return dataclasses.replace(batch, **{field.name: getattr(batch, field.name)[begin:end]
                                         for field in dataclasses.fields(batch)})


def _jsonable(value: Any) -> Any:
    """A value JSON cannot write: an array or a numpy number as its list or number, a date as ISO text, anything
    else as its text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _serve(reply_fd: int, path: str, trainer: int) -> None:
    """The child: import the function, then score every batch that arrives on stdin."""
    if sys.platform.startswith("linux"):  # die with the trainer, also while the function hangs
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != trainer:  # the trainer died before that was set
        os._exit(1)
    # The trainer's import path, in place of this file's directory first (and what its .pth files added).
    sys.path[:] = json.loads(os.environ.get(SYS_PATH_VARIABLE, "null")) or sys.path
    os.set_inheritable(reply_fd, False)
    replies = os.fdopen(reply_fd, "w", encoding="utf-8")
    os.dup2(2, 1)  # what the function prints goes to the trainer's stderr, never to the reply pipe

    def send(reply: dict[str, Any]) -> None:
        replies.write(json.dumps(reply, default=_jsonable) + "\n")
        replies.flush()

    # posttrain's batch type and import rules, loaded by path: the package would import torch (seconds).
    spec = importlib.util.spec_from_file_location("posttrain_reward_user_functions",
                                                  Path(__file__).with_name("user_functions.py"))
    user_functions = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = user_functions  # dataclasses look their module up by name
    spec.loader.exec_module(user_functions)
    try:
        function = user_functions.import_reward_function(path)
    except ValueError as err:
        send({"id": IMPORT_ID, "error": str(err)})
        return
    send({"id": IMPORT_ID, "ok": True})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            scores = function(user_functions.Completions(**request["batch"]))
        except Exception:  # noqa: BLE001 - the user's function failed: the trainer records it per row
            send({"id": request["id"], "error": traceback.format_exc().rstrip()})
        else:  # as returned (an array or tensor as its list): the trainer checks it, as an in-process function's
            send({"id": request["id"], "scores": scores.tolist() if hasattr(scores, "tolist") else scores})


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
