"""Choices measured once per machine: kept in memory and in a file, read by later processes, and one answer per
machine even when two processes measure at once."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from posttrain.models import machine_choices
from posttrain.models.machine_choices import cache_file, machine, measured_choice


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("POSTTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(machine_choices, "_choices", {})


def _measuring(answer: str, log: list[str]):
    return lambda: log.append(answer) or answer


def test_a_choice_is_measured_once_and_a_new_process_reads_it_from_the_file(monkeypatch):
    log: list[str] = []
    assert measured_choice("gemm", ("a", "b"), _measuring("b", log)) == "b"
    assert measured_choice("gemm", ("a", "b"), _measuring("a", log)) == "b" and log == ["b"]  # from memory
    assert json.loads(cache_file().read_text()) == {f"{machine()}|gemm": "b"}
    monkeypatch.setattr(machine_choices, "_choices", {})  # a new process: memory empty, the file stays
    assert measured_choice("gemm", ("a", "b"), _measuring("a", log)) == "b" and log == ["b"]
    assert measured_choice("other", ("a", "b"), _measuring("a", log)) == "a" and log == ["b", "a"]
    assert len(json.loads(cache_file().read_text())) == 2


def test_a_cache_on_a_file_system_without_locks_still_measures_and_keeps_the_answer(monkeypatch):
    """flock failing (NFS without a lock daemon: ENOLCK; Lustre: ENOSYS) made every model load raise OSError."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    log: list[str] = []
    assert measured_choice("gemm", ("a", "b"), _measuring("b", log)) == "b" and log == ["b"]
    assert json.loads(cache_file().read_text()) == {f"{machine()}|gemm": "b"}


def test_an_answer_stored_while_this_process_waited_for_the_lock_is_taken_unmeasured(monkeypatch):
    real_lock = machine_choices._locked

    @contextlib.contextmanager
    def locked_after_another_process_stored_its_answer():
        with real_lock():
            cache_file().write_text(json.dumps({f"{machine()}|gemm": "a"}))
            yield

    monkeypatch.setattr(machine_choices, "_locked", locked_after_another_process_stored_its_answer)
    log: list[str] = []
    assert measured_choice("gemm", ("a", "b"), _measuring("b", log)) == "a" and log == []
    assert json.loads(cache_file().read_text()) == {f"{machine()}|gemm": "a"}


def test_two_processes_that_need_a_choice_at_once_measure_it_once_and_agree(tmp_path):
    """Each process measures slowly and would answer its own label; the lock makes the second wait and read."""
    script = textwrap.dedent(f"""
        import os, sys, time
        from posttrain.models.machine_choices import measured_choice
        label = sys.argv[1]
        def measure():
            with open({str(tmp_path / "measured")!r}, "a") as log:
                log.write(label + "\\n")
            time.sleep(2.0)  # long enough that both start within it
            return label
        print(measured_choice("gemm", ("first", "second"), measure))
    """)
    environment = {**os.environ, "POSTTRAIN_CACHE_DIR": str(tmp_path / "cache")}
    processes = [subprocess.Popen([sys.executable, "-c", script, label], stdout=subprocess.PIPE, text=True,
                                  env=environment) for label in ("first", "second")]
    answers = {process.communicate(timeout=120)[0].strip() for process in processes}
    assert len(answers) == 1 and answers <= {"first", "second"}
    assert (tmp_path / "measured").read_text().split() == list(answers)  # measured once, by the one that answered


def test_a_stored_answer_that_is_not_an_option_is_measured_again():
    cache_file().parent.mkdir(parents=True, exist_ok=True)
    cache_file().write_text(json.dumps({f"{machine()}|gemm": "c", "other": 1}))
    log: list[str] = []
    assert measured_choice("gemm", ("a", "b"), _measuring("a", log)) == "a" and log == ["a"]
    assert json.loads(cache_file().read_text())[f"{machine()}|gemm"] == "a"


def test_an_unwritable_cache_keeps_the_choice_in_memory(monkeypatch, tmp_path):
    blocked = tmp_path / "a file"
    blocked.write_text("")
    monkeypatch.setenv("POSTTRAIN_CACHE_DIR", str(blocked / "cache"))  # under a file: cannot be created
    log: list[str] = []
    assert measured_choice("gemm", ("a", "b"), _measuring("b", log)) == "b"
    assert measured_choice("gemm", ("a", "b"), _measuring("a", log)) == "b" and log == ["b"]
    assert not cache_file().exists()
