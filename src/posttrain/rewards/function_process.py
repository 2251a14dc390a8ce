"""A user's reward function named by import path, run in a child process with a hard time limit per call.

The child (this file run by its path, `python function_process.py <reply fd> <import path> <trainer pid>`; never
imported by it) imports the function once and scores one batch per request. A function that hangs, crashes the
interpreter or runs out of memory takes only the child down: the trainer waits at most `timeout_s` for each call,
then kills the child's process group (the child and whatever it started). Either way the call's rows score 0
with an error record each, as for any error of a reward function (`WeightedRewards`, `error_log`), and the next
call starts a fresh child. A batch of more than `MAX_ROWS` completions is sent in parts of that size, each with
its own limit and its own errors, so that scoring a whole data set (offline RFT) is not one call, and one part
that fails costs only its own rows.

The child runs as the trainer's user, with its environment, working directory and import path: it may read files
and call services as the function would inside the trainer. It is not locked down: the `python` grader's sandbox
(`rewards.graders.python_grader`) is the place for code that must not write files or reach the network. It dies
with the trainer, also when the trainer is SIGKILLed mid-call, and takes its process group (what the function started)
along: a thread of the child watches for it, and a child started by the trainer's main thread also gets
PR_SET_PDEATHSIG (SIGTERM, handled by killing the group), which holds while the function blocks that thread
(PR_SET_PDEATHSIG fires when the starting *thread* ends, so it is not set for children started by other threads).

Protocol: one JSON request per line on the child's stdin (`{"id", "seed", "batch"}`), one JSON reply per request
on a pipe of its own (`{"id", "scores"}` or `{"id", "error"}`; the first, id "import", says whether the function
imported). The child's fd 1 is its fd 2 (the trainer's stderr), so nothing the function prints reads as a score.
The seed is drawn from the trainer's Python RNG and seeds the child's `random`, numpy's and (where the function
imported torch) torch's generators before the call: a function that samples (a judge at temperature, a random
control) scores a rerun or a resumed run the same, as it would inside the trainer, whose RNG states the
checkpoints save. Scores come back as the function returned them (a list, nested or not; an array or tensor as its
list), for the trainer to check as it checks an in-process function's.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import importlib.abc
import importlib.util
import json
import math
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
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
    """The child process died (a crash, out of memory, os._exit) or closed its reply pipe before it replied."""


@dataclasses.dataclass
class PartScores:
    """Scores with the error of each row that has one (None elsewhere): a batch sent in parts, or one scored row by
    row after it failed whole. Read by `WeightedRewards` as the function's scores and errors (no parts, no error
    flags: the same names as a batch scored whole)."""

    scores: list[float]
    errors: list[str | None]


class UserFunctionProcess:
    """`fn(batch) -> scores` for the function at `path` (`package.module:function` or `file.py:function`), run in
    a child process. `start()` (also called by the first batch) raises ValueError when the function cannot be
    imported within `timeout_s`."""

    def __init__(self, path: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"reward.timeout_s must be a finite number of seconds > 0, got {timeout_s}")
        self.path, self.timeout_s = path, float(timeout_s)
        self.__name__ = path.rpartition(":")[2]
        # Where it was named: a restart imports it from the same place, whatever the trainer did since.
        self._cwd, self._sys_path = os.getcwd(), list(sys.path)
        self._process: subprocess.Popen | None = None
        self._replies = -1  # read end of the reply pipe
        self._pending = bytearray()
        self._calls = 0
        self._owner = os.getpid()  # a forked copy of this object must not use (or kill) its creator's child
        self._lock = threading.Lock()

    def start(self) -> None:
        self._adopt_after_fork()
        with self._lock:
            self._start()

    def __call__(self, batch: Completions) -> Any:
        """The function's scores, as it returned them; for a batch of more than `MAX_ROWS`, a `PartScores`."""
        self._adopt_after_fork()
        with self._lock:
            if len(batch) <= MAX_ROWS:
                return self._score(batch)
            from posttrain.rewards.user_functions import score_alone  # the trainer's side only (imports posttrain)

            scores: list[Any] = []
            errors: list[str | None] = []
            for begin in range(0, len(batch), MAX_ROWS):
                part = batch.rows(begin, begin + MAX_ROWS)
                try:
                    scores += _one_per_row(self._score(part), len(part))
                    errors += [None] * len(part)
                except Exception as err:  # noqa: BLE001 - this part's rows, one at a time; the other parts go on
                    part_scores, part_errors = score_alone(self._score, part, err, (TimeoutError, ChildExited))
                    scores += part_scores
                    errors += part_errors
            return PartScores(scores=scores, errors=errors)

    def _adopt_after_fork(self) -> None:
        """In a forked copy: forget the creator's child (its process and pipes are the creator's) and any lock a
        thread of the creator held at the fork."""
        if self._owner != os.getpid():
            if self._replies >= 0:
                os.close(self._replies)  # this process's copy of the descriptor
            self._process, self._replies, self._pending = None, -1, bytearray()
            self._owner, self._lock = os.getpid(), threading.Lock()

    def _start(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        self.close()
        replies, write_end = os.pipe()
        environment = {**os.environ, SYS_PATH_VARIABLE: json.dumps(self._sys_path)}
        watch_thread = threading.current_thread() is threading.main_thread()
        # -P (Python 3.11+): not this file's directory first on the path while the child imports the standard library
        command = [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), str(Path(__file__).resolve()),
                   str(write_end), self.path, str(os.getpid()), "1" if watch_thread else "0"]
        try:
            # A session of its own: a timeout kills the child's process group, never the trainer's.
            self._process = subprocess.Popen(command, stdin=subprocess.PIPE, bufsize=0, pass_fds=(write_end,),
                                             env=environment, cwd=self._cwd, start_new_session=True)
        except BaseException:
            os.close(replies)
            raise
        finally:
            os.close(write_end)
        os.set_blocking(self._process.stdin.fileno(), False)  # `_send` waits with a deadline, not in os.write
        self._replies, self._pending = replies, bytearray()
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
        seed = random.getrandbits(63)  # drawn first: a start that fails must not shift the later calls' seeds
        self._start()
        self._calls += 1
        try:
            self._send({"id": self._calls, "seed": seed, "batch": dataclasses.asdict(batch)})
            reply = self._reply(self._calls, f"score a batch of {len(batch)}")
        except BaseException:  # a timeout, a crash, Ctrl-C: the child's state is unknown; the next call starts anew
            self.close()
            raise
        if "error" in reply:
            raise RewardFunctionError(reply["error"])
        return reply["scores"]

    def _send(self, request: dict[str, Any]) -> None:
        """Write the request within `timeout_s`: the child reads whenever it is not scoring, but a child that dies
        while processes it started keep its stdin open would otherwise leave the write blocked."""
        data = memoryview((json.dumps(request, default=_jsonable) + "\n").encode())
        for _ in self._ticks(self._process.stdin.fileno(), select.POLLOUT, "read its batch"):
            try:
                data = data[os.write(self._process.stdin.fileno(), data):]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise self._exited("read its batch") from None
            if not data:
                return

    def _ticks(self, fd: int, event: int, doing: str) -> Iterator[None]:
        """Yield each time `fd` is ready for `event`, until `timeout_s` has passed (TimeoutError) or the child has
        died (ChildExited), which is checked every `ALIVE_CHECK_S`: what it started may hold its pipes open."""
        deadline = time.monotonic() + self.timeout_s
        poller = select.poll()  # not select.select: it fails on descriptors >= 1024
        poller.register(fd, event)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"reward function {self.path} did not {doing} within {self.timeout_s:g} s "
                                   f"(reward.timeout_s): its process was killed")
            if poller.poll(1000 * min(left, ALIVE_CHECK_S)):
                yield
            elif self._process.poll() is not None:
                raise self._exited(doing)

    def _reply(self, request_id: int | str, doing: str) -> dict[str, Any]:
        """The child's reply to `request_id`, waited for at most `timeout_s`."""
        for _ in self._ticks(self._replies, select.POLLIN, doing):
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                raise self._exited(doing)
            self._pending += chunk
            while b"\n" in self._pending:
                end = self._pending.index(b"\n")
                reply = json.loads(bytes(self._pending[:end]))
                del self._pending[:end + 1]
                if reply.get("id") == request_id:
                    return reply
                # else never: a call given up on closes the child with its pending replies
        raise AssertionError("unreachable: _ticks ends only by raising")

    def _exited(self, doing: str) -> ChildExited:
        try:
            code = self._process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:  # alive with its reply pipe closed: `close` kills it
            how = "closed its reply pipe"
        else:
            how = f"exited with code {code}"
            if code < 0:
                name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
                how = f"was killed by {name}{' (out of memory?)' if code == -signal.SIGKILL else ''}"
        return ChildExited(f"the process of reward function {self.path} {how} when it was to {doing} "
                           f"(its output is in the log)")

    def close(self) -> None:
        """Kill the child and everything it started (if any), and release its pipes; the next call starts anew."""
        process, self._process = self._process, None
        if process is not None and self._owner == os.getpid():
            try:  # the group's id stays allocated while any process of the group lives, reaped child or not
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
    """The function at `path` in a started child process, one per function, limit and working directory in this
    process (the start-up check's is the run's). ValueError: it does not import within `timeout_s`."""
    key = (path, timeout_s, os.getcwd(), os.getpid())
    process = _processes.get(key)
    if process is None:
        process = UserFunctionProcess(path, timeout_s)
        process.start()
        _processes[key] = process
    return process


@contextlib.contextmanager
def user_function_processes_closed() -> Iterator[None]:
    """Kill the children started within the block after it: at the end of the run that started them, so that none
    outlives it in a long-lived process (a notebook) and the next run imports the function's file as it is then."""
    before = set(_processes)
    try:
        yield
    finally:
        _close_processes_since(before)


def _close_processes_since(before: set[tuple[Any, ...]]) -> None:
    failures = []
    for key in [key for key in _processes if key not in before]:
        try:
            _processes.pop(key).close()
        except OSError as err:  # the others are stopped all the same
            failures.append(err)
    if failures:
        raise failures[0]


@atexit.register
def close_user_function_processes() -> None:
    """Kill every child this process started (at exit)."""
    _close_processes_since(set())


def _one_per_row(scores: Any, rows: int) -> list[float | None]:
    """A part's scores as one number per row (nested lists flattened, as the trainer flattens a whole batch's), or
    None where the function does not apply (TRL's convention: `WeightedRewards` leaves it out of the total)."""
    flat = list(_flatten(scores))
    if len(flat) != rows:
        raise ValueError(f"returned {len(flat)} scores for {rows} completions")
    if not all(value is None or isinstance(value, (int, float)) for value in flat):
        raise ValueError("must return one number (or None) per completion")
    return [None if value is None else float(value) for value in flat]


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, list):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


def _jsonable(value: Any) -> Any:
    """A value JSON cannot write: an array or a numpy number as its list or number, a date as ISO text, anything
    else as its text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _serve(reply_fd: int, path: str, trainer: int, main_thread: bool) -> None:
    """The child: import the function, then score every batch that arrives on stdin."""
    # Dying with the trainer takes what the function started along (the child leads its own process group): SIGTERM
    # from the kernel when the starting thread ends, handled between the function's bytecodes and in its blocking
    # calls, and the watch thread for the rest.
    serving = os.getpid()
    # What the function forks (a multiprocessing worker it may terminate()) must not take the handler along
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    signal.signal(signal.SIGTERM, lambda *_: _end_group() if os.getpid() == serving else os._exit(143))
    if main_thread and sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != trainer:  # the trainer died before that was set
        _end_group()
    threading.Thread(target=_exit_with, args=(trainer,), daemon=True).start()
    # The trainer's import path, in place of this file's directory first (and what its .pth files added).
    sys.path[:] = json.loads(os.environ.get(SYS_PATH_VARIABLE, "null")) or sys.path
    os.set_inheritable(reply_fd, False)
    replies = os.fdopen(reply_fd, "w", encoding="utf-8")
    os.dup2(2, 1)  # what the function prints goes to the trainer's stderr, never to the reply pipe

    def send(reply: str) -> None:
        replies.write(reply + "\n")
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
        send(json.dumps({"id": IMPORT_ID, "error": str(err)}))
        return
    send(json.dumps({"id": IMPORT_ID, "ok": True}))
    if "torch" not in sys.modules:
        sys.meta_path.insert(0, _SeedTorchOnImport())
    for line in sys.stdin:
        request = json.loads(line)
        _seed_generators(request["seed"])
        try:
            scores = function(user_functions.Completions(**request["batch"]))
            # as returned (an array or tensor as its list): the trainer checks it, as an in-process function's
            scores = scores.tolist() if hasattr(scores, "tolist") else scores
            reply = json.dumps({"id": request["id"], "scores": scores}, default=_jsonable)
        except Exception:  # noqa: BLE001 - the user's function failed: the trainer records it per row
            reply = json.dumps({"id": request["id"], "error": traceback.format_exc().rstrip()})
        send(reply)


def _seed_generators(seed: int) -> None:
    """Seed the global generators a function may draw from: `random`, numpy's (imported here if it is installed, a
    tenth of a second, so that a function importing it lazily is seeded too) and torch's: now if the function
    imported torch, else the moment it does (`_SeedTorchOnImport`; importing torch here would cost seconds)."""
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        pass
    else:
        numpy.random.seed(seed % 2**32)
    _SeedTorchOnImport.seed = seed
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


class _SeedTorchOnImport(importlib.abc.MetaPathFinder):
    """Seeds torch with the current call's seed as soon as a function imports it: a function that imports torch in
    its body draws the same numbers in its first call in a fresh child (a resume, a restart after a timeout) as
    in the same call of a child that had imported it earlier."""

    seed = 0

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "torch":
            return None
        sys.meta_path.remove(self)  # the real finders from here on
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            execute = spec.loader.exec_module

            def exec_module(module: Any) -> None:
                execute(module)
                module.manual_seed(_SeedTorchOnImport.seed)

            spec.loader.exec_module = exec_module
        return spec


def _exit_with(trainer: int) -> None:
    """End when the trainer has gone (this process re-parented): the child's own watch, whichever thread of the
    trainer started it."""
    while os.getppid() == trainer:
        time.sleep(ALIVE_CHECK_S)
    _end_group()


def _end_group() -> None:
    """SIGKILL this child's process group: the child and whatever the function started in it (a process of a
    session of its own escapes, as from the trainer's timeout)."""
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(1)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
