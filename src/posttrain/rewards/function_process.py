"""A user's reward function named by import path, run in a child process with a hard timeout.

The child (this file run by its path, `python -I function_process.py <reply fd> <import path>`; never imported
by it) imports the function once and scores one batch per request. A function that hangs, crashes the
interpreter or runs out of memory takes only the child down: the trainer waits `timeout_s` for each batch, and
past it kills the child's process group. Either way the batch's rows score 0 with an error record each, as for
any error of a reward function (`WeightedRewards`, `error_log`), and the next batch starts a fresh child.

The child runs as the trainer's user, with its environment, working directory and import path: it may read files
and call services as the function would inside the trainer. It is not locked down: the `python` grader's sandbox
(`rewards.graders.python_grader`) is the place for code that must not write files or reach the network.

Protocol: one JSON request per line on the child's stdin (`{"id", "batch"}`), one JSON reply per request on a
pipe of its own (`{"id", "scores"}` or `{"id", "error"}`; the first, id "import", says whether the function
imported). The child's fd 1 is its fd 2 (the trainer's stderr), so nothing the function prints reads as a score.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from posttrain.rewards.user_functions import Completions

DEFAULT_TIMEOUT_S = 120.0
SYS_PATH_VARIABLE = "POSTTRAIN_REWARD_SYS_PATH"  # the trainer's import path (JSON) for the child, started with -I
IMPORT_ID = "import"


class RewardFunctionError(Exception):
    """The user's function raised in the child process; the message is the child's traceback."""


class UserFunctionProcess:
    """`fn(batch) -> scores` for the function at `path` (`package.module:function` or `file.py:function`), run in
    a child process. `start()` (also called by the first batch) raises ValueError when the function cannot be
    imported (or its import takes longer than `timeout_s`)."""

    def __init__(self, path: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not timeout_s > 0:
            raise ValueError(f"a reward function's timeout must be > 0 seconds, got {timeout_s}")
        self.path, self.timeout_s = path, float(timeout_s)
        self.__name__ = path.rpartition(":")[2]
        self._process: subprocess.Popen | None = None
        self._replies = -1  # read end of the reply pipe
        self._pending = b""
        self._calls = 0

    def start(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        self.close()
        replies, write_end = os.pipe()
        environment = {**os.environ, SYS_PATH_VARIABLE: json.dumps(sys.path)}
        # -I: the child's import path is the trainer's (SYS_PATH_VARIABLE), not this file's directory first.
        # A session of its own: a timeout kills the child's process group, never the trainer's.
        command = [sys.executable, "-I", str(Path(__file__).resolve()), str(write_end), self.path]
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, pass_fds=(write_end,), env=environment,
                                         start_new_session=True)
        os.close(write_end)
        self._replies, self._pending = replies, b""
        try:
            reply = self._reply(IMPORT_ID, "import")
        except (TimeoutError, RuntimeError) as err:  # a start-up fault: one error naming the function
            raise ValueError(str(err)) from None
        if "error" in reply:
            self.close()
            raise ValueError(reply["error"])

    def __call__(self, batch: Completions) -> list[float] | float:
        self.start()
        self._calls += 1
        request = {"id": self._calls, "batch": dataclasses.asdict(batch)}
        try:
            self._process.stdin.write((json.dumps(request, default=_jsonable) + "\n").encode())
            self._process.stdin.flush()
        except BrokenPipeError:  # the child died between two batches: _reply reports how
            pass
        reply = self._reply(self._calls, f"score a batch of {len(batch)}")
        if "error" in reply:
            raise RewardFunctionError(reply["error"])
        return reply["scores"]

    def _reply(self, request_id: int | str, doing: str) -> dict[str, Any]:
        """The child's reply to `request_id`, waited for at most `timeout_s`; the child is killed past it."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            line, newline, rest = self._pending.partition(b"\n")
            if newline:
                self._pending = rest
                reply = json.loads(line)
                if reply.get("id") == request_id:
                    return reply
                continue  # a reply to a request given up on (never: a timeout kills the child)
            left = deadline - time.monotonic()
            ready = select.select([self._replies], [], [], max(0.0, left))[0] if left > 0 else []
            if not ready:
                self.close()
                raise TimeoutError(f"reward function {self.path} did not {doing} within {self.timeout_s:g} s "
                                   f"(reward.timeout_s): its process was killed, and the next batch starts a new one")
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                code = self._process.wait()
                self.close()
                raise RuntimeError(f"the process of reward function {self.path} exited with code {code} while "
                                   f"it was to {doing} (its output is in the log); the next batch starts a new one")
            self._pending += chunk

    def close(self) -> None:
        """Kill the child (if any) and release its pipes; the next call starts a new one."""
        if self._process is not None:
            if self._process.poll() is None:
                try:
                    os.killpg(self._process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._process.wait()
            self._process.stdin.close()
            self._process = None
        if self._replies >= 0:
            os.close(self._replies)
            self._replies = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit: the child sees its stdin close and exits anyway
            pass


def _jsonable(value: Any) -> Any:
    """A column value JSON cannot write: an array or a numpy scalar as its list or number, anything else as text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _as_scores(result: Any) -> list[float] | float:
    """A function's result as numbers (a list, tuple, array or tensor: its floats; a lone number as is)."""
    if hasattr(result, "tolist"):
        result = result.tolist()
    if isinstance(result, (int, float)):
        return float(result)
    return [float(x) for x in result]


def _serve(reply_fd: int, path: str) -> None:
    """The child: import the function, then score every batch that arrives on stdin."""
    sys.path[:] = json.loads(os.environ.get(SYS_PATH_VARIABLE, "null")) or sys.path
    replies = os.fdopen(reply_fd, "w", encoding="utf-8")
    os.dup2(2, 1)  # what the function prints goes to the trainer's stderr, never to the reply pipe

    def send(reply: dict[str, Any]) -> None:
        replies.write(json.dumps(reply) + "\n")
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
            scores = _as_scores(function(user_functions.Completions(**request["batch"])))
        except Exception:  # noqa: BLE001 - the user's function failed: the trainer records it per row
            send({"id": request["id"], "error": traceback.format_exc().rstrip()})
        else:
            send({"id": request["id"], "scores": scores})


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2])
