"""`python`: a user's `def grade(sample, item) -> float` run in a separate, locked-down process.

What is enforced (by `sandbox_runner`, before the user's code is compiled):
- wall-clock timeout per sample (`timeout_s`): the process group is killed, the sample scores 0 and the
  next sample gets a fresh process; CPU time is capped too (RLIMIT_CPU);
- memory limit (`memory_mb`, RLIMIT_AS): an allocation beyond it raises MemoryError or kills the
  process, either way the sample scores 0;
- no network: fresh user + network namespaces where the kernel allows them, and every socket
  constructor replaced by one that raises (the fallback on kernels without namespaces);
- scrubbed environment: the child's environment holds only PATH and LANG (no tokens, no HOME), and
  Python runs isolated (-I: no PYTHON* variables, no user site-packages, no current directory on sys.path);
- no access to the run directory: the child's working directory is a fresh empty temp directory that is
  deleted afterwards, and the run directory's path is never passed to it. (Reading absolute paths the
  process user can read is NOT prevented: this is containment of mistakes and runaway code, not a jail
  for hostile code; run untrusted graders in a container.)
- writes: at most 1 MiB per file (RLIMIT_FSIZE).

An exception, a timeout, a crash, or a return value that is not a finite number in [0, 1] gives the
sample score 0 and an error record (`GradeResult.errors`); the run goes on.
"""

from __future__ import annotations

import ast
import json
import os
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
        spec.only("type", "name", "source", "image_tag", "timeout_s", "memory_mb")
        self.name = spec.get("name", str, "python")
        self.source = spec.get("source", str)
        self.timeout_s = float(spec.get("timeout_s", (int, float), 2.0))
        self.memory_mb = int(spec.get("memory_mb", int, 512))
        if self.timeout_s <= 0 or self.memory_mb < 64:
            raise spec.error("timeout_s must be > 0 and memory_mb >= 64")
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
                        child = self._start(workdir)
                    reply = child.ask({"sample": dict(sample), "item": _jsonable(item)}, self.timeout_s)
                    fatal = reply.get("fatal")
                    if "value" in reply:
                        score, error = checked_score(reply["value"])
                    else:
                        score, error = 0.0, reply["error"]
                    if reply.get("restart"):  # the process is gone or stuck: the next sample gets a new one
                        child.kill()
                        child = None
                    scores.append(score)
                    errors.append(error)
            finally:
                if child is not None:
                    child.kill()
        return GradeResult(scores, errors=errors)

    def _start(self, workdir: str) -> _Child:
        process = subprocess.Popen([sys.executable, "-I", str(RUNNER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, cwd=workdir, env=SAFE_ENV, start_new_session=True,
                                   text=True)
        child = _Child(process)
        child.send({"source": self.source, "memory_mb": self.memory_mb, "cpu_s": max(1, int(self.timeout_s * 4) + 1)})
        return child


class _Child:
    """One sandbox process: a JSON line in, a JSON line out, within a deadline."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process

    def send(self, payload: dict[str, Any]) -> None:
        self.process.stdin.write(json.dumps(payload) + "\n")
        self.process.stdin.flush()

    def ask(self, payload: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        try:
            self.send(payload)
        except (BrokenPipeError, OSError):
            return {"error": "the grader process died (the source failed to load, or a previous call crashed it)",
                    "restart": True}
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, left))
            if not ready:
                return {"error": f"timed out after {timeout_s:g} s", "restart": True}
            line = self.process.stdout.readline()
            if not line:
                code = self.process.wait()
                why = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
                return {"error": f"the grader process {why} (memory limit?)", "restart": True}
            try:
                reply = json.loads(line)
            except json.JSONDecodeError:
                continue  # the user's code wrote to the protocol's stdout: not a reply
            if "fatal" in reply:
                error = f"the grader source failed to load: {reply['fatal']}"
                return {"error": error, "fatal": error, "restart": True}
            return reply

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


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
