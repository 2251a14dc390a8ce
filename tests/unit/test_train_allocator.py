"""glibc's malloc thresholds set once per process when training starts (`train.allocator`), and left alone wherever
the user or another allocator decides them."""

from __future__ import annotations

import platform

import pytest

from posttrain.train import allocator

GLIBC = platform.libc_ver()[0] == "glibc"


class _FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answers = [1, 1]

        def mallopt(parameter: int, value: int) -> int:
            self.calls.append((parameter, value))
            return self.answers[len(self.calls) - 1]

        self.mallopt = mallopt


def _no_user_settings(monkeypatch) -> None:
    for name in (*allocator.USER_SETTINGS, "GLIBC_TUNABLES", "LD_PRELOAD", "POSTTRAIN_MALLOC_TUNING"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_libc(monkeypatch):
    libc = _FakeLibc()
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("glibc", "2.36"))
    _no_user_settings(monkeypatch)
    allocator.keep_freed_memory.cache_clear()
    yield libc
    allocator.keep_freed_memory.cache_clear()


def test_the_mmap_threshold_is_fixed_at_32_mib_and_the_heap_top_kept_up_to_1_gib_once_per_process(fake_libc):
    assert allocator.keep_freed_memory() is True
    assert allocator.keep_freed_memory() is True
    assert fake_libc.calls == [(-3, 32 * 1024 * 1024), (-1, 1024 * 1024 * 1024)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


@pytest.mark.parametrize("setting", [("POSTTRAIN_MALLOC_TUNING", "0"), ("LD_PRELOAD", "libtcmalloc_minimal.so.4"),
                                     ("MALLOC_TRIM_THRESHOLD_", "131072"), ("MALLOC_MMAP_THRESHOLD_", "65536"),
                                     ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072")])
def test_the_users_own_malloc_settings_or_another_allocator_are_left_as_they_are(fake_libc, monkeypatch, setting):
    monkeypatch.setenv(*setting)
    assert allocator.keep_freed_memory() is False
    assert fake_libc.calls == []


def test_unrelated_preloads_and_tunables_do_not_stop_it(fake_libc, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/opt/intel/lib/libiomp5.so")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
    assert allocator.keep_freed_memory() is True


def test_a_refused_value_is_said_and_the_other_still_set(fake_libc):
    fake_libc.answers = [0, 1]
    assert allocator.keep_freed_memory() is False
    assert [parameter for parameter, _ in fake_libc.calls] == [-3, -1]


def test_a_c_library_that_cannot_be_opened_is_left_as_it_is(fake_libc, monkeypatch):
    def no_library(name):
        raise OSError("no C library")

    monkeypatch.setattr(allocator.ctypes, "CDLL", no_library)
    assert allocator.keep_freed_memory() is False


def test_another_c_library_is_left_as_it_is(fake_libc, monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))  # musl, macOS
    assert allocator.keep_freed_memory() is False
    assert fake_libc.calls == []


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt: this C library is not glibc")
def test_glibc_accepts_both_thresholds(monkeypatch):
    # the module's own path against the real C library (uncached, with no setting of the user's in the way)
    _no_user_settings(monkeypatch)
    assert allocator.keep_freed_memory.__wrapped__() is True
