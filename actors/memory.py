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
keeps per-thread caches small, `allocator_env` preloads it into every Ray worker of a local run
(Ray's issue threads on worker fragmentation advise the same) and `preload_driver` into the
command line's own process (every subcommand; for ``run``, the driver), both with
`JEMALLOC_CONF`. By default jemalloc returns an arena's freed pages only as that arena is used
again, so an arena whose thread went idle after a peak (one of a threaded actor's many call
threads, the sink's maintenance thread after a publication) keeps them, and which threads held
pages when the RSS is read made the source pool's RSS swing by 35 MB. `JEMALLOC_CONF` starts
jemalloc's background threads, which return every arena's pages once they have been free for a
second; the trimmer's purge of every arena stays for a ``MALLOC_CONF`` of the user's own.

pyarrow allocates its buffers from a pool of its own, mimalloc by default, which keeps freed
segments for reuse outside jemalloc's decay: the sink's Parquet merges and publications stepped its
RSS up by tens of MB that it kept. Under jemalloc, `allocator_env` points Arrow at the process's
allocator (``ARROW_DEFAULT_MEMORY_POOL=system``), so its pages are returned like the rest;
``bench/copy_memory.py`` measures the difference.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
import time
from collections.abc import Callable
from functools import partial

TRIM_EVERY_S = 60.0
_ALL_ARENAS = 4096  # jemalloc's MALLCTL_ARENAS_ALL: "arena.<i>.purge" for every arena
# Background threads purge pages free for 1 s in every arena (dirty), at once (muzzy: no second
# stage); pages that a thread frees and soon needs again stay (the default decay is 10 s).
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"


def jemalloc() -> str | None:
    """The jemalloc library a run preloads (found as the dynamic loader finds libraries), or None:
    the machine has none, or the user's environment sets ``LD_PRELOAD`` to something else
    (``LD_PRELOAD=`` turns the preload off)."""
    lib = ctypes.util.find_library("jemalloc") if sys.platform.startswith("linux") else None  # LD_PRELOAD is the Linux loader's
    return lib if lib is not None and os.environ.get("LD_PRELOAD", lib) == lib else None


def allocator_env() -> dict[str, str]:
    """Environment variables for the Ray workers of a local run: `jemalloc` preloaded, if any, with
    `JEMALLOC_CONF` and Arrow's memory pool on it, unless the user's environment sets ``MALLOC_CONF``
    or ``ARROW_DEFAULT_MEMORY_POOL``."""
    lib = jemalloc()
    if lib is None:
        return {}
    return {
        "LD_PRELOAD": lib,
        "MALLOC_CONF": os.environ.get("MALLOC_CONF", JEMALLOC_CONF),
        "ARROW_DEFAULT_MEMORY_POOL": os.environ.get("ARROW_DEFAULT_MEMORY_POOL", "system"),
    }


def preload_driver() -> None:
    """Re-execute this process with `jemalloc` preloaded, unless it already is or there is none.

    The driver of a run lives as long as its workers. A library can be preloaded only when a
    process starts, so the command line starts itself again, with the same interpreter options and
    arguments (``sys.orig_argv``) and `allocator_env`'s variables, before it has done anything; the
    process id stays the same.
    """
    lib = jemalloc()
    if lib is not None and os.environ.get("LD_PRELOAD") != lib:
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **allocator_env()})


def _heap_release() -> Callable[[], object] | None:
    """The call that gives the process's freed heap pages back to the OS: jemalloc's purge of every
    arena when jemalloc is the process's allocator, else glibc's ``malloc_trim(0)``, else None."""
    mallctl = getattr(ctypes.CDLL(None), "mallctl", None)  # present only when jemalloc is loaded
    if mallctl is not None:
        return partial(mallctl, f"arena.{_ALL_ARENAS}.purge".encode(), None, None, None, 0)
    name = ctypes.util.find_library("c")
    try:
        return partial(ctypes.CDLL(name).malloc_trim, 0) if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


class HeapTrimmer:
    """``trimmer()`` trims the heap when ``every_s`` seconds have passed since it last did; safe to
    call from any thread, and costs a clock read otherwise. ``trims`` counts the trims done."""

    def __init__(self, every_s: float = TRIM_EVERY_S) -> None:
        self.every_s = every_s
        self.trims = 0
        self._trim = _heap_release()
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self) -> None:
        if self._trim is None or time.monotonic() - self._last < self.every_s:
            return
        with self._lock:
            if time.monotonic() - self._last < self.every_s:
                return
            self._last = time.monotonic()
        self._trim()
        self.trims += 1
