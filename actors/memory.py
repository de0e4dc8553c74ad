"""Giving freed heap memory back to the OS in the long-lived actor processes.

glibc keeps the pages of freed memory in its arenas (one per thread that allocates, up to eight per
core) and returns them to the OS only from the top of the main heap. A process whose load peaks
(a burst of larger batches after a slow spell, a thread pool that grows) then keeps its peak
resident for the rest of a run of weeks, and its RSS cannot tell that from a leak. `HeapTrimmer`
calls ``malloc_trim(0)`` at most once a period, from the code the process runs anyway, so its RSS
follows what it holds (as Dask's workers do). Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

TRIM_EVERY_S = 60.0


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
