"""`HeapTrimmer` gives the pages of freed C heap memory back to the OS, at most once a period."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from actors.memory import JEMALLOC_CONF, HeapTrimmer, allocator_env, jemalloc, preload_driver

ROOT = Path(__file__).resolve().parents[2]

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
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libjemalloc.so.2" if name == "jemalloc" else None)
    jemalloc_env = {"LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": JEMALLOC_CONF, "ARROW_DEFAULT_MEMORY_POOL": "system"}
    assert allocator_env() == jemalloc_env
    monkeypatch.setenv("MALLOC_CONF", "narenas:1")  # the user's settings win
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "mimalloc")
    assert allocator_env() == {**jemalloc_env, "MALLOC_CONF": "narenas:1", "ARROW_DEFAULT_MEMORY_POOL": "mimalloc"}
    monkeypatch.setenv("LD_PRELOAD", "")  # the user's own choice (here: none) wins
    assert allocator_env() == {}
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert allocator_env() == {}


def test_the_command_line_starts_itself_again_under_jemalloc_once(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, args, env: calls.append((path, args, env)))
    monkeypatch.setattr(sys, "orig_argv", ["python", "-X", "utf8", "run_pipeline.py", "--max-windows", "3"])
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libjemalloc.so.2" if name == "jemalloc" else None)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    preload_driver()
    assert len(calls) == 1
    path, args, env = calls[0]
    assert path == sys.executable and args == sys.orig_argv
    assert env["LD_PRELOAD"] == "libjemalloc.so.2" and env["MALLOC_CONF"] == JEMALLOC_CONF
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")  # the process it started: preloaded already
    preload_driver()
    monkeypatch.setenv("LD_PRELOAD", "")  # the user's choice wins
    preload_driver()
    assert len(calls) == 1


def run_probe(tmp_path: Path, code: str, env: dict[str, str]) -> str:
    """Stdout of ``code`` run as a script by this interpreter with ``env`` (the repository importable)."""
    probe = tmp_path / "probe.py"
    probe.write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + code)
    out = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(jemalloc() is None, reason="this machine has no jemalloc")
def test_run_pipeline_runs_itself_again_with_jemalloc_mapped(tmp_path):
    # The probe says whether jemalloc is mapped, then runs the command line as `python run_pipeline.py`
    # does: it starts the probe again under the preload, which says so and runs the command.
    out = run_probe(tmp_path, "import runpy\n"
                    "print('jemalloc' in open('/proc/self/maps').read(), flush=True)\n"
                    f"sys.argv = [{str(ROOT / 'run_pipeline.py')!r}, '--version']\n"
                    "runpy.run_path(sys.argv[0], run_name='__main__')\n",
                    {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})
    assert out.splitlines()[:2] == ["False", "True"] and len(out.splitlines()) == 3


FREE_AND_IDLE = (
    "import ctypes\n"
    "import psutil\n"
    "heap = ctypes.CDLL(None)\n"
    "heap.malloc.restype = ctypes.c_void_p\n"
    "heap.free.argtypes = [ctypes.c_void_p]\n"
    "heap.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]\n"
    "blocks = [heap.malloc(4096) for _ in range(50_000)]\n"
    "for b in blocks: heap.memset(b, 1, 4096)\n"
    "for b in blocks[:-1]: heap.free(b)\n"
    "rss = lambda: psutil.Process().memory_info().rss >> 20\n"
    "before = rss()\n"
)


@pytest.mark.skipif(jemalloc() is None, reason="this machine has no jemalloc")
def test_under_the_runs_jemalloc_settings_an_idle_arena_hands_its_pages_back_by_itself(tmp_path):
    # 200 MB freed and then left idle: with `allocator_env`'s settings jemalloc's background threads
    # return the pages within seconds, with no call into the allocator; with its defaults they stay.
    code = FREE_AND_IDLE + "import time\ntime.sleep(4)\nprint(before, rss())\n"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_CONF"}
    before, after = map(int, run_probe(tmp_path, code, {**env, **allocator_env()}).split())
    assert after < before - 150, (before, after)
    before, after = map(int, run_probe(tmp_path, code, {**env, "LD_PRELOAD": jemalloc()}).split())
    assert after > before - 50, (before, after)


@pytest.mark.skipif(jemalloc() is None, reason="this machine has no jemalloc")
def test_under_jemalloc_the_trimmer_purges_freed_pages_of_an_idle_arena(tmp_path):
    # jemalloc's defaults (no background threads) hand an arena's freed pages back only as that
    # arena is used again: 200 MB freed and then left idle stay resident until a purge.
    code = FREE_AND_IDLE + (
        "from actors.memory import HeapTrimmer\n"
        "trimmer = HeapTrimmer(every_s=0.0)\n"
        "trimmer()\n"
        "print(before, rss(), trimmer.trims)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_CONF"}
    before, after, trims = map(int, run_probe(tmp_path, code, {**env, "LD_PRELOAD": jemalloc()}).split())
    assert trims == 1 and after < before - 150, (before, after)


@pytest.mark.skipif(jemalloc() is None, reason="this machine has no jemalloc")
def test_under_the_runs_settings_arrow_allocates_from_jemalloc_and_its_freed_buffers_go_back(tmp_path):
    # The sink's Parquet merges allocate through Arrow's default pool: under `allocator_env` that
    # pool is the process's own allocator, so 200 MB of buffers freed and left idle are returned.
    code = (
        "import time\n"
        "import psutil\n"
        "import pyarrow as pa\n"
        "rss = lambda: psutil.Process().memory_info().rss >> 20\n"
        "start = rss()\n"
        "buffers = [pa.allocate_buffer(64 * 1024) for _ in range(3200)]\n"
        "for b in buffers: memoryview(b).cast('B')[::4096] = b'\\x01' * (len(b) // 4096)\n"
        "peak = rss()\n"
        "del buffers, b\n"
        "time.sleep(4)\n"
        "print(pa.default_memory_pool().backend_name, start, peak, rss())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_CONF", "ARROW_DEFAULT_MEMORY_POOL")}
    backend, start, peak, after = run_probe(tmp_path, code, {**env, **allocator_env()}).split()
    start, peak, after = int(start), int(peak), int(after)
    assert backend == "system" and peak > start + 150, (backend, start, peak)
    assert after < peak - 150, (start, peak, after)
