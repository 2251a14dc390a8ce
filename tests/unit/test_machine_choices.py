"""Choices measured once per machine: kept in memory and in a file, read by later processes, and one answer per
machine even when two processes measure at once."""

import json

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


def test_the_first_answer_stored_wins_over_one_measured_at_the_same_time():
    def measured_while_another_process_stored_its_answer() -> str:
        cache_file().parent.mkdir(parents=True, exist_ok=True)
        cache_file().write_text(json.dumps({f"{machine()}|gemm": "a"}))
        return "b"

    assert measured_choice("gemm", ("a", "b"), measured_while_another_process_stored_its_answer) == "a"
    assert json.loads(cache_file().read_text()) == {f"{machine()}|gemm": "a"}


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
