"""The python grader's isolation, each hole reproduced with a tiny grader: output on fd 1, a partial line then a
sleep, a grandchild in a session of its own, forged result lines, writes outside the temp dir, a fork bomb, a
signal to the trainer."""

from __future__ import annotations

import os
import textwrap
import time

import pytest

from posttrain.rewards.graders import build_grader
from posttrain.rewards.graders.sandbox_runner import LIBC, PID_MAX_MIN, SYS_LANDLOCK_CREATE_RULESET


def run(source: str, outputs: list[str], **spec):
    grader = build_grader({"type": "python", "source": textwrap.dedent(source), **spec})
    return grader.grade([{"output_text": o} for o in outputs], [{} for _ in outputs])


def landlock() -> bool:
    return LIBC.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, 1) > 0


def test_output_on_fd1_is_kept_off_the_result_channel():
    result = run("""
        import subprocess, sys
        def grade(sample, item):
            print("0.9", file=sys.__stdout__, flush=True)
            subprocess.run(["echo", "1"])
            print('{"value": 1.0}', file=sys.__stdout__, flush=True)
            return len(sample["output_text"]) / 10
    """, ["abc", "abcde"])
    assert result.scores == pytest.approx([0.3, 0.5]) and result.errors == [None, None]


def test_grader_output_is_the_error_record():
    result = run("""
        def grade(sample, item):
            print("looking at", sample["output_text"])
            raise ValueError("bad sample")
    """, ["xyz"])
    assert result.scores == [0.0]
    assert "ValueError: bad sample" in result.errors[0] and "Traceback" in result.errors[0]
    assert "looking at xyz" in result.errors[0]


def test_partial_line_then_sleep_times_out_on_time():
    start = time.monotonic()
    result = run("""
        import os, sys, time
        def grade(sample, item):
            os.write(1, b'{"value": 1')
            time.sleep(30)
            return 1.0
    """, ["a"], timeout_s=1)
    assert time.monotonic() - start < 8
    assert result.scores == [0.0] and "timed out" in result.errors[0]


def test_forged_result_lines_cannot_move_scores_between_samples():
    # Sample 0 writes replies for every id shape it can guess onto the result pipe, then times out; sample 1
    # must get its own score, never a forged one.
    result = run("""
        import json, os, time
        def grade(sample, item):
            if sample["output_text"] == "forger":
                for fd in range(3, 20):
                    for payload in ({"value": 1.0}, {"id": None, "value": 1.0}, {"id": "0" * 32, "value": 1.0}):
                        try:
                            os.write(fd, (json.dumps(payload) + "\\n").encode())
                        except OSError:
                            pass
                return 0.0
            return 0.25
    """, ["forger", "honest", "honest"])
    assert result.scores == [0.0, 0.25, 0.25] and result.errors == [None, None, None]


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_grandchild_in_a_new_session_dies_with_the_timeout(tmp_path):
    # The grandchild reports its pid as seen from outside by writing its /proc/self link target into output.
    result = run("""
        import os, subprocess, time
        def grade(sample, item):
            subprocess.Popen(["sh", "-c", "sleep 60"], start_new_session=True)
            time.sleep(30)
    """, ["a"], timeout_s=1)
    assert "timed out" in result.errors[0]

    def survivors() -> list[str]:
        return [pid for pid in os.listdir("/proc") if pid.isdigit() and pid_alive(int(pid))
                and _cmdline(pid) == "sleep\x0060\x00"]

    # The kernel kills a PID namespace's processes after its init dies, asynchronously: on a loaded machine (CI's two
    # test workers) that took longer than 0.2 s once. A grandchild that escaped would still be there after 5 s of 60.
    deadline = time.monotonic() + 5.0
    while survivors() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert survivors() == []


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:
        return ""


@pytest.mark.skipif(not landlock(), reason="this kernel has no Landlock: the grader can write where its user can")
def test_writes_outside_the_temp_dir_are_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    result = run(f"""
        import os, tempfile
        def grade(sample, item):
            with open("inside.txt", "w") as f:  # its own temp dir stays writable
                f.write("ok")
            with tempfile.NamedTemporaryFile() as f:
                f.write(b"ok")
            action = sample["output_text"]
            if action == "write":
                open({str(tmp_path / 'new.txt')!r}, "w").write("x")
            elif action == "delete":
                os.remove({str(victim)!r})
            return 1.0
    """, ["write", "delete", "none"])
    assert result.scores == [0.0, 0.0, 1.0]
    assert all("PermissionError" in e for e in result.errors[:2])
    assert victim.read_text() == "keep" and not (tmp_path / "new.txt").exists()


def test_fork_bomb_is_bounded():
    # max_processes (RLIMIT_NPROC) for a user; root is exempt from it, so then the PID namespace's pid_max.
    bound = 8 if os.getuid() else PID_MAX_MIN
    result = run("""
        import os, time
        def grade(sample, item):
            children = 0
            for _ in range(1000):
                try:
                    pid = os.fork()
                except OSError:
                    break
                if pid == 0:
                    time.sleep(30)
                    os._exit(0)
                children += 1
            return children / 1000
    """, ["a"], max_processes=8, timeout_s=5)
    assert result.errors == [None] and 0 < result.scores[0] * 1000 < bound


def test_grader_cannot_signal_the_trainer():
    trainer = os.getpid()
    result = run(f"""
        import os, signal
        def grade(sample, item):
            os.kill({trainer}, signal.SIGTERM)
            return 1.0
    """, ["a"])
    assert result.scores == [0.0] and ("ProcessLookupError" in result.errors[0]
                                       or "PermissionError" in result.errors[0])


def test_a_large_item_to_a_grader_stuck_loading_times_out_on_time():
    """Writing a request larger than the pipe (64 KiB) blocked before the deadline started, forever when the grader
    never reads (its source hangs at import): code-grading items with test cases are that large."""
    grader = build_grader({"type": "python", "timeout_s": 1, "source": textwrap.dedent("""
        import time
        time.sleep(10 ** 6)
        def grade(sample, item):
            return 1.0
    """)})
    start = time.monotonic()
    result = grader.grade([{"output_text": "a"}], [{"tests": "x" * 300_000}])
    assert result.errors[0].startswith("timed out after 1 s") and time.monotonic() - start < 10


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_the_sandbox_dies_with_a_trainer_killed_mid_grade(tmp_path, signal_name):
    """The runner and its init were re-parented to PID 1 and lived on (a sleeping grader forever, a spinning one
    until its CPU limit) when the trainer was killed while it graded."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent("""
        from posttrain.rewards.graders import build_grader
        grader = build_grader({"type": "python", "timeout_s": 600, "source":
                               "import time\\ndef grade(sample, item):\\n    time.sleep(600)\\n"})
        print("grading", flush=True)
        grader.grade([{"output_text": "a"}], [{}])
    """))
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline() == "grading\n"
        deadline = time.monotonic() + 30
        while not _sandbox_of(trainer.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _sandbox_of(trainer.pid), "the grader's sandbox never started"
        trainer.send_signal(getattr(signal, signal_name))
        trainer.wait(30)
        deadline = time.monotonic() + 10
        while _sandbox_of(trainer.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _sandbox_of(trainer.pid) == []
    finally:
        trainer.kill()


def _sandbox_of(trainer: int) -> list[str]:
    """The sandbox processes (runner, init, worker: one command line) a trainer of this pid started."""
    return [pid for pid in os.listdir("/proc") if pid.isdigit()
            and _cmdline(pid).rstrip("\x00").split("\x00")[-1:] == [str(trainer)]
            and "sandbox_runner.py" in _cmdline(pid)]


def test_a_crashed_grader_says_how_it_ended():
    """The runner always exited 0, so every crash read "exited with status 0 (memory limit?)"."""
    result = run("""
        import ctypes, os
        def grade(sample, item):
            if sample["output_text"] == "exit":
                os._exit(5)
            ctypes.string_at(0)
    """, ["exit", "segv"])
    assert result.errors[0].startswith("the grader process exited with status 5")
    assert result.errors[1].startswith("the grader process was killed by SIGSEGV")


def test_the_grader_works_when_the_trainer_holds_over_1024_descriptors():
    """select() refuses descriptors >= 1024: every row of such a trainer (many open files, sockets) was an error."""
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        result = run("def grade(sample, item):\n    return 0.5\n", ["a", "b"])
    finally:
        for fd in held:
            os.close(fd)
    assert result.scores == [0.5, 0.5] and result.errors == [None, None]
