"""Giving freed heap memory back to the OS in the long-lived actor processes.

glibc keeps the pages of freed memory in its arenas (one per thread that allocates, up to eight per
core) and returns them to the OS only from the top of the main heap. A process whose load peaks
(a burst of larger batches after a slow spell, a thread pool that grows) then keeps its peak
resident for the rest of a run of weeks, and its RSS cannot tell that from a leak. `HeapTrimmer`
calls ``malloc_trim(0)`` at most once a period, from the code the process runs anyway, so its RSS
follows what it holds (as Dask's workers do). Elsewhere than glibc it does nothing.

Trimming cannot return a page that still holds one live block, and with an arena per thread the
live blocks of a threaded actor (the model's and the sink's call threads, Arrow's and torch's
pools) are spread over many arenas. `allocator_env` caps the arenas of every Ray worker of a run
(``MALLOC_ARENA_MAX``, read by glibc when a process starts); `limit_arenas` caps the driver's own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time

TRIM_EVERY_S = 60.0
ARENA_MAX = 2  # glibc's default is 8 per core
_M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def allocator_env() -> dict[str, str]:
    """Environment variables for every Ray worker of a run: glibc's arena cap, ``ARENA_MAX`` unless
    the user's environment sets its own."""
    return {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", str(ARENA_MAX))}


def limit_arenas() -> bool:
    """Cap this process's glibc arenas as `allocator_env` caps the workers'; call it before the
    process starts threads. False where the C library is not glibc."""
    libc = _libc()
    try:
        return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, int(allocator_env()["MALLOC_ARENA_MAX"])))
    except AttributeError:  # no mallopt: not glibc
        return False


def _malloc_trim() -> ctypes._CFuncPtr | None:
    libc = _libc()
    try:
        return None if libc is None else libc.malloc_trim
    except AttributeError:  # not glibc (musl, macOS): nothing to trim
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
