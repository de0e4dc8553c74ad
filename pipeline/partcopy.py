"""Copying committed parts into one Parquet file: the bytes of a merge or a publication.

`copy_parts` writes the rows of parts of one schema to one file through `OutputFS.write_atomic`,
one row group of one part at a time. A copy of at least `CHILD_COPY_BYTES` of parts runs in a
short-lived child process (``python -m pipeline.partcopy``), so its buffers end with that process:
a sink runs for weeks, and every allocator of a process (Python's, Arrow's, the C library's) keeps
some pages of its largest copies, so its resident memory stepped up at each deeper merge and each
publication. Smaller copies (the frequent shallow merges) stay in the process, where starting one
(about 0.3 s) would cost more than the copy.

The child dies with its parent (Linux: ``PR_SET_PDEATHSIG``), and exits without writing when its
parent is already gone, so a restarted sink never meets a file that a copy of its predecessor
moved into place after the restart's recovery.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import signal
import subprocess
import sys
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import OutputError
from pipeline.manifest import Part
from pipeline.outputfs import OutputFS

ROW_GROUP_BYTES = 16 << 20  # row groups of published files and merged parts: about this many bytes of Arrow data
CHILD_COPY_BYTES = 16 << 20  # parts (bytes on disk) from which a copy runs in a child process
_PR_SET_PDEATHSIG = 1


def copy_parts(out: OutputFS, rel: str, parts: list[Part], compression: str) -> None:
    """Write the rows of ``parts`` (one schema, in this order) to the file ``rel`` of ``out``,
    atomically; in a child process when they hold at least `CHILD_COPY_BYTES` (module docstring).
    Raises `OutputError` (a full disk, an unreadable part) with nothing half-written left."""
    if _disk_bytes(out, parts) >= CHILD_COPY_BYTES:
        _copy_in_child(out, rel, parts, compression)
    else:
        _copy_here(out, rel, parts, compression)


def string_columns(schema: pa.Schema) -> list[str]:
    """Parquet paths of the string leaves of ``schema``: the only columns worth a dictionary.

    Float columns (flow, embeddings) have few repeats, and building a dictionary for them
    costs about 5x the rest of the write for nothing.
    """
    paths: list[str] = []

    def walk(t: pa.DataType, path: str) -> None:
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            paths.append(path)
        elif pa.types.is_struct(t):
            for f in t:
                walk(f.type, f"{path}.{f.name}")
        elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            walk(t.value_type, f"{path}.list.element")

    for f in schema:
        walk(f.type, f.name)
    return paths


def _disk_bytes(out: OutputFS, parts: list[Part]) -> int:
    return sum(i.size or 0 for i in out.fs.get_file_info([out.path(p.path) for p in parts]))


def _copy_here(out: OutputFS, rel: str, parts: list[Part], compression: str) -> None:
    out.write_atomic(rel, lambda fh: _copy_row_groups(fh, out, parts, compression))


def _copy_row_groups(fh: BinaryIO, out: OutputFS, parts: list[Part], compression: str) -> None:
    """Write the rows of ``parts`` to ``fh`` in row groups of about `ROW_GROUP_BYTES`, reading one
    row group of one part at a time: a merged part is many row groups, so memory stays about two
    row groups however large the period."""
    w = None
    batch: list[pa.Table] = []
    size = 0
    try:
        for p in parts:
            with pq.ParquetFile(out.path(p.path), filesystem=out.fs) as src:
                for i in range(src.num_row_groups):
                    t = src.read_row_group(i)
                    if w is None:
                        w = pq.ParquetWriter(fh, t.schema, compression=compression,
                                             use_dictionary=string_columns(t.schema))
                    batch.append(t)
                    size += t.nbytes
                    if size >= ROW_GROUP_BYTES:
                        w.write_table(pa.concat_tables(batch), row_group_size=1 << 30)
                        batch, size = [], 0
        if batch and w is not None:
            w.write_table(pa.concat_tables(batch), row_group_size=1 << 30)
    finally:
        if w is not None:
            w.close()
        batch = []  # freed before the release below
        # Arrow's allocator keeps freed pages for reuse; give back what an in-process copy used.
        pa.default_memory_pool().release_unused()


def _copy_in_child(out: OutputFS, rel: str, parts: list[Part], compression: str) -> None:
    """`_copy_here` in a new Python process; its `OutputError` is raised here as one."""
    job = pickle.dumps({"parent": os.getpid(), "out": out, "rel": rel, "parts": parts, "compression": compression})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # this process's imports
    done = subprocess.run([sys.executable, "-m", "pipeline.partcopy"], input=job, capture_output=True, env=env)
    if done.returncode == 0:
        return
    try:
        err = json.loads(done.stdout)
    except ValueError:  # it died without a word: a signal (the OOM killer), or an interpreter failure
        why = (f"signal {signal.Signals(-done.returncode).name}" if done.returncode < 0
               else (done.stderr.decode(errors="replace").strip().splitlines() or [f"exit {done.returncode}"])[-1])
        raise OutputError(f"the copy into {rel} failed in its child process: {why}", source=out.where) from None
    raise OutputError(err["message"], source=err["source"])


def _die_with_parent(parent: int) -> bool:
    """Ask Linux to kill this process when its parent ends; whether the parent is still ``parent``."""
    prctl = getattr(ctypes.CDLL(None), "prctl", None) if sys.platform.startswith("linux") else None
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    return os.getppid() == parent


def main() -> int:
    """The child process: one copy, described by a pickle on stdin (from `_copy_in_child`, our own
    parent); an error goes to stdout as JSON, a message and a source for an `OutputError`."""
    job = pickle.loads(sys.stdin.buffer.read())
    if not _die_with_parent(job["parent"]):
        print("the process that started this copy has ended; nothing was written", file=sys.stderr)
        return 1
    try:
        _copy_here(job["out"], job["rel"], job["parts"], job["compression"])
    except Exception as exc:
        if not isinstance(exc, OutputError):
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
            exc = OutputError(f"the copy into {job['rel']} failed in its child process: {type(exc).__name__}: {first}",
                              source=job["out"].where)
        print(json.dumps({"message": exc.cause, "source": exc.source}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
