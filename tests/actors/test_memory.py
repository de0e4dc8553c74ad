"""`HeapTrimmer` gives the pages of freed C heap memory back to the OS, at most once a period."""

from __future__ import annotations

import ctypes
import ctypes.util

import psutil
import pytest

from actors.memory import ARENA_MAX, HeapTrimmer, allocator_env, limit_arenas

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]


@pytest.mark.skipif(HeapTrimmer()._trim is None, reason="malloc_trim is glibc's")
def test_a_trim_returns_freed_heap_pages_that_free_alone_keeps():
    rss = psutil.Process().memory_info
    # 200 MB of small blocks; all but the last freed, so the heap's top stays in use and free()
    # alone cannot shrink it.
    blocks = [libc.malloc(4096) for _ in range(50_000)]
    for b in blocks:
        libc.memset(b, 1, 4096)
    for b in blocks[:-1]:
        libc.free(b)
    before = rss().rss
    waiting = HeapTrimmer(every_s=3600.0)
    waiting()
    assert waiting.trims == 0 and rss().rss > before - 50 * 2**20  # within its period: nothing done
    trimmer = HeapTrimmer(every_s=0.0)
    trimmer()
    assert trimmer.trims == 1 and rss().rss < before - 150 * 2**20
    libc.free(blocks[-1])


def test_workers_get_the_arena_cap_unless_the_user_set_one(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert allocator_env() == {"MALLOC_ARENA_MAX": str(ARENA_MAX)}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert allocator_env() == {"MALLOC_ARENA_MAX": "4"}


@pytest.mark.skipif(HeapTrimmer()._trim is None, reason="mallopt's arena cap is glibc's")
def test_the_driver_caps_its_own_arenas():
    assert limit_arenas()
