"""`HeapTrimmer` gives the pages of freed C heap memory back to the OS, at most once a period."""

from __future__ import annotations

import ctypes
import ctypes.util

import psutil
import pytest

from actors.memory import HeapTrimmer, allocator_env

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


def test_workers_preload_jemalloc_where_the_machine_has_it(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libjemalloc.so.2" if name == "jemalloc" else None)
    assert allocator_env() == {"LD_PRELOAD": "libjemalloc.so.2"}
    monkeypatch.setenv("LD_PRELOAD", "")  # the user's own choice (here: none) wins
    assert allocator_env() == {}
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert allocator_env() == {}
