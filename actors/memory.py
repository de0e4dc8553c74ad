"""Giving freed heap memory back to the OS in the long-lived actor processes.

glibc keeps the pages of freed memory in its arenas (one per thread that allocates, up to eight per
core) and returns them to the OS only from the top of the main heap. A process whose load peaks
(a burst of larger batches after a slow spell, a thread pool that grows) then keeps its peak
resident for the rest of a run of weeks, and its RSS cannot tell that from a leak. `HeapTrimmer`
calls ``malloc_trim(0)`` at most once a period, from the code the process runs anyway, so its RSS
follows what it holds (as Dask's workers do). Elsewhere than glibc it does nothing.

Trimming cannot return a page that still holds one live block, and the model's and the sink's
native heaps (torch, Arrow, Ray's core worker, many threads) fragment so that their RSS still
steps up at each new peak. Where the machine has jemalloc (Debian's ``libjemalloc2``), which
returns dirty pages on a timer and keeps per-thread caches small, `allocator_env` preloads it
into every Ray worker of a local run (Ray's issue threads on worker fragmentation advise the same).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time

TRIM_EVERY_S = 60.0


def allocator_env() -> dict[str, str]:
    """Environment variables for the Ray workers of a local run: jemalloc preloaded where the
    machine has it (found as the dynamic loader finds libraries), nothing otherwise or when the
    user's environment already sets ``LD_PRELOAD``."""
    jemalloc = ctypes.util.find_library("jemalloc")
    return {} if jemalloc is None or "LD_PRELOAD" in os.environ else {"LD_PRELOAD": jemalloc}


def _malloc_trim() -> ctypes._CFuncPtr | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


class HeapTrimmer:
    """``trimmer()`` trims the heap when ``every_s`` seconds have passed since it last did; safe to
    call from any thread, and costs a clock read otherwise. ``trims`` counts the trims done."""

    def __init__(self, every_s: float = TRIM_EVERY_S) -> None:
        self.every_s = every_s
        self.trims = 0
        self._trim = _malloc_trim()
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self) -> None:
        if self._trim is None or time.monotonic() - self._last < self.every_s:
            return
        with self._lock:
            if time.monotonic() - self._last < self.every_s:
                return
            self._last = time.monotonic()
        self._trim(0)
        self.trims += 1
