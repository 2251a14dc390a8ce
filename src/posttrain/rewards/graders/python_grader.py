"""`python`: a user's `def grade(sample, item) -> float` run in a separate, locked-down process.

What is enforced (by `sandbox_runner`, before the user's code is compiled), and where it holds:
- results: each reply travels on a pipe of its own (not fd 1) and carries the random id of the request it
  answers, so nothing the grader prints or forges can be taken for another sample's score. Its fd 1 and fd 2
  are captured: their last lines, with the traceback, are the sample's error record;
- wall-clock timeout per sample (`timeout_s`), kept whatever the grader writes: the runner's process group is
  killed, and with the PID namespace (Linux user namespaces) the kernel then kills every process the grader
  started, also one in a session of its own. Without user namespaces a process that left the session
  survives the kill (it dies with its parent only if it kept PR_SET_PDEATHSIG). CPU time is capped too;
- processes: at most `max_processes` (RLIMIT_NPROC). The kernel exempts root from that limit: a grader of a
  root trainer is bounded by its PID namespace's pid_max instead (301, Linux >= 6.14), and is unbounded on
  kernels without either;
- file system: read-only except the grader's fresh temp directory (its cwd and TMPDIR, deleted afterwards),
  by Landlock (Linux >= 5.13 with Landlock enabled). Without Landlock the grader can write and delete
  whatever the trainer's user can: it is NOT isolated there. Reading is not restricted;
- signals: in its PID namespace the grader cannot name the trainer, and Landlock (ABI >= 6) scopes signals
  to the sandbox; without either it can signal the trainer (same user);
- memory limit (`memory_mb`, RLIMIT_AS); no network (fresh network namespace where allowed, and every socket
  constructor replaced by one that raises); scrubbed environment (PATH, LANG, TMPDIR only) and Python
  isolated (-I); writes at most 1 MiB per file (RLIMIT_FSIZE).
This contains mistakes and runaway code; it is not a jail for hostile code (run untrusted graders in a
container).

An exception, a timeout, a crash, or a return value that is not a finite number in [0, 1] gives the
sample score 0 and an error record (`GradeResult.errors`, with the traceback and the grader's output).
"""

from __future__ import annotations

import ast
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain.rewards.graders.base import GradeResult, Item, Sample, Spec, checked_score

RUNNER = Path(__file__).with_name("sandbox_runner.py")
SAFE_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


class PythonGrader:
    def __init__(self, spec: Spec) -> None:
        spec.only("type", "name", "source", "image_tag", "timeout_s", "memory_mb", "max_processes")
        self.name = spec.get("name", str, "python")
        self.source = spec.get("source", str)
        self.timeout_s = float(spec.get("timeout_s", (int, float), 2.0))
        self.memory_mb = int(spec.get("memory_mb", int, 512))
        self.max_processes = int(spec.get("max_processes", int, 16))
        if self.timeout_s <= 0 or self.memory_mb < 64 or self.max_processes < 1:
            raise spec.error("timeout_s must be > 0, memory_mb >= 64 and max_processes >= 1")
        _check_source(self.source, spec)

    def grade(self, samples: Sequence[Sample], items: Sequence[Item]) -> GradeResult:
        scores, errors = [], []
        with tempfile.TemporaryDirectory(prefix="grader-") as workdir:
            child, fatal = None, None
            try:
                for sample, item in zip(samples, items, strict=True):
                    if fatal is not None:  # the source cannot load: no point starting a process per sample
                        scores.append(0.0)
                        errors.append(fatal)
                        continue
                    if child is None:
                        child = _Child.start(self, workdir)
                    reply = child.ask({"sample": dict(sample), "item": _jsonable(item)}, self.timeout_s)
                    if "value" in reply:
                        score, error = checked_score(reply["value"])
                    else:
                        score, error = 0.0, reply["error"]
                    if "fatal" in reply:
                        fatal = error
                    if reply.get("restart"):  # the process is gone or stuck: the next sample gets a new one
                        child.kill()
                        child = None
                    scores.append(score)
                    errors.append(error)
            finally:
                if child is not None:
                    child.kill()
        return GradeResult(scores, errors=errors)


class _Child:
    """One sandbox process: a JSON request line on its stdin; the reply, tagged with the request's random id, on
    a pipe of its own (fd 1 and fd 2 are the user's, kept as the error record); within a deadline, which covers
    writing the request too (a large item fills the pipe while a grader stuck loading does not read it).

    A reply counts only with the id of the request it answers: a line the user's code forges on the result pipe
    cannot be taken for another sample's score, as that sample's id does not exist yet."""

    OUTPUT_KEPT = 4096  # the last bytes of the grader's own output kept for an error record

    def __init__(self, process: subprocess.Popen, results: int, load_id: str) -> None:
        self.process, self.results, self.load_id = process, results, load_id
        self.pending, self.output = b"", b""
        self.unsent = b""  # request bytes the child has not read yet
        os.set_blocking(process.stdin.fileno(), False)

    @classmethod
    def start(cls, grader: PythonGrader, workdir: str) -> _Child:
        results, write_end = os.pipe()
        # A session of its own: the timeout kills its whole process group, never the trainer's.
        process = subprocess.Popen([sys.executable, "-I", str(RUNNER), str(write_end), str(os.getpid())],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   pass_fds=(write_end,), cwd=workdir, env={**SAFE_ENV, "TMPDIR": workdir},
                                   start_new_session=True)
        os.close(write_end)
        child = cls(process, results, secrets.token_hex(16))
        child.unsent = _line({"id": child.load_id, "source": grader.source, "memory_mb": grader.memory_mb,
                              "cpu_s": max(1, int(grader.timeout_s * 4) + 1), "processes": grader.max_processes})
        return child

    def ask(self, payload: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """{"value"} or {"error"}; with "restart" when the process must be replaced, "fatal" when the source
        does not load (the reply to the setup's id)."""
        request_id = secrets.token_hex(16)
        self.output = b""
        self.unsent += _line({"id": request_id, **payload})
        deadline = time.monotonic() + timeout_s
        stdin, stdout = self.process.stdin.fileno(), self.process.stdout.fileno()
        poller = select.poll()  # not select.select: it fails on descriptors >= 1024
        for fd, event in ((self.results, select.POLLIN), (stdout, select.POLLIN), (stdin, select.POLLOUT)):
            poller.register(fd, event)
        while True:
            for line in self._lines():
                reply = _parse(line)
                if reply.get("id") == self.load_id and reply.get("fatal"):
                    return {**self._failed(f"the grader source failed to load: {reply.get('error')}",
                                           reply.get("traceback")), "fatal": True}
                if reply.get("id") == request_id:
                    self._drain_output()
                    if "value" in reply:
                        return {"value": reply["value"]}
                    return {"error": self._record(str(reply.get("error")), reply.get("traceback"))}
            left = deadline - time.monotonic()
            if left <= 0:
                return self._failed(f"timed out after {timeout_s:g} s")
            for fd, _ in poller.poll(1000 * left):
                if fd == stdin:
                    try:
                        self.unsent = self.unsent[os.write(stdin, self.unsent):]
                    except BlockingIOError:
                        pass
                    except OSError:
                        return self._failed("the grader process died (a previous call crashed it)")
                    if not self.unsent:
                        poller.unregister(stdin)
                elif fd == stdout:
                    if not self._read_output():
                        poller.unregister(stdout)
                else:
                    data = os.read(self.results, 1 << 16)
                    if not data:
                        return self._failed(f"the grader process {self._exit_reason(deadline)}")
                    self.pending = (self.pending + data)[-(1 << 20):]  # a reply is a short line

    def _lines(self) -> list[bytes]:
        *lines, self.pending = self.pending.split(b"\n")
        return lines

    def _read_output(self) -> bool:
        data = os.read(self.process.stdout.fileno(), 1 << 16)
        self.output = (self.output + data)[-self.OUTPUT_KEPT:]
        return bool(data)

    def _drain_output(self) -> None:
        poller = select.poll()
        poller.register(self.process.stdout.fileno(), select.POLLIN)
        while poller.poll(0) and self._read_output():
            pass

    def _exit_reason(self, deadline: float) -> str:
        """Why the result pipe closed: the runner exits with the worker's status (128 + the signal that killed it)."""
        try:
            code = self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return "closed its result pipe"
        if code > 128 and code - 128 in signal.valid_signals():
            name = signal.Signals(code - 128).name
            return f"was killed by {name}" + (" (memory or CPU time limit?)" if name in ("SIGKILL", "SIGXCPU") else "")
        if code < 0:
            return f"was killed by {signal.Signals(-code).name if -code in signal.valid_signals() else -code}"
        return f"exited with status {code}"

    def _record(self, error: str, trace: str | None = None) -> str:
        """The error, with the grader's traceback and the tail of what it wrote on fd 1 and fd 2."""
        parts = [error]
        if trace:
            parts.append(trace.rstrip())
        if self.output:
            parts.append("grader output (last lines):\n" + self.output.decode(errors="replace").rstrip())
        return "\n".join(parts)

    def _failed(self, error: str, trace: str | None = None) -> dict[str, Any]:
        self._drain_output()
        return {"error": self._record(error, trace), "restart": True}

    def kill(self) -> None:
        """SIGKILL to the runner's process group, also once the runner itself has exited (what the grader started
        may live on in it): with the PID namespace, the kernel then ends every process the grader started, in
        whatever session."""
        try:  # the group's id stays allocated while any process of the group lives, reaped leader or not
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        os.close(self.results)


def _line(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload) + "\n").encode()


def _parse(line: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return reply if isinstance(reply, dict) else {}


def _check_source(source: str, spec: Spec) -> None:
    """Syntax and the presence of `grade`, checked without running anything."""
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise spec.error(f"the grader source does not parse: {err.msg} (source line {err.lineno})", "source") from None
    if not any(isinstance(node, ast.FunctionDef) and node.name == "grade" for node in tree.body):
        raise spec.error("the grader source must define `def grade(sample, item) -> float`", "source")


def _jsonable(item: Item) -> dict[str, Any]:
    return json.loads(json.dumps(dict(item), default=str))
