"""Publishing: a stream's committed parts of one period of media time become large visible files.

Period ``k`` of a stream (``publish_every_s = P``) holds the windows whose ``t_start`` is in
``[k*P, (k+1)*P)``, their ``flow`` and ``student`` rows, and the ``errors`` rows committed while
the stream's latest committed window was in it. It is *closed* once a committed window of the
stream starts at or after ``(k+1)*P``. One publication of a period, each step safe to crash after:

1. each table's unpublished parts of the period are copied, in commit order, into one file (one
   more when the row schema changes, e.g. another model's embedding size), written hidden and then
   moved to ``<table>/stream_id=<id>/part-<k>-<piece>-<n>.parquet`` (visible);
2. the manifest records the publication (those files, and the parts they replace);
3. the replaced parts are deleted.

A crash before 2 leaves visible files no manifest names: the next open deletes them, and the
parts, still named as unpublished, are published again. A crash before 3 leaves parts the
manifest no longer names: the next open deletes them. Plain glob readers never see a part (they
are under ``_parts/``), so at every moment they see each published row once; a published file
they may have seen before a crash is only withdrawn, never doubled.

A period published before it closed (a stream that ended, a run that drained) and continued by a
resume is published again as its next *piece*, holding only the rows committed since.

**Merging** (`merge_parts`): until its period closes, a stream's hidden parts are merged like a
log-structured tree, every `MERGE_FANOUT` parts of one table, period and level into one part of
the next level (written, recorded, then the merged parts deleted, as a publication), so a live
stream committing every 5 s keeps about ``(MERGE_FANOUT - 1) x levels`` hidden parts per table
(21 for an hour of 5 s commits) and rewrites each row about ``levels`` times before publishing.

**Retention** (`retire`): with ``retain_days = D``, a published period whose end is more than
``D`` days of media time before the stream's latest committed window is deleted (the manifest
first says so; the ids stay committed, so a resume does not redo them).
"""

from __future__ import annotations

import math
import re
import uuid
from contextlib import AbstractContextManager, nullcontext

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.manifest import IdSet, ManifestStore, Part, StreamState
from pipeline.outputfs import OutputFS
from pipeline.partcopy import copy_parts

PARTS_DIR = "_parts"
MERGE_FANOUT = 8
# a hidden part (part-<seq>-<token>), a published file (part-<period>-<piece>-<n>), or either's temporary file
_OURS = re.compile(r"^(\.)?part-(\d{8}-[0-9a-f]{8}|-?\d+-\d{3,}-\d{2,})\.parquet(?(1)\.tmp)$")


def period_of(t: float, every_s: float) -> int:
    """The period of media time ``t`` (seconds)."""
    return math.floor(t / every_s)


def closed(state: StreamState, period: int, every_s: float) -> bool:
    """Whether ``period`` is closed: a committed window starts at or after its end."""
    return state.t_max is not None and state.t_max >= (period + 1) * every_s


def published_name(table: str, stream_id: str, period: int, piece: int, n: int) -> str:
    """A published file's path relative to the output folder."""
    return f"{table}/stream_id={stream_id}/part-{period:06d}-{piece:03d}-{n:02d}.parquet"


def publish(out: OutputFS, store: ManifestStore, state: StreamState, stream_id: str, period: int,
            *, compression: str = "zstd", lock: AbstractContextManager = nullcontext()) -> list[dict]:
    """Publish the unpublished parts of ``period`` (see the module docstring); returns the files.
    ``lock`` guards ``state`` against concurrent commits: held to read it and to append the record,
    not during the copy (parts committed meanwhile are published by a later call, as the next piece)."""
    with lock:
        parts = state.unpublished(period)
        piece = len(state.periods[period].pieces) if period in state.periods else 0
    if not parts:
        return []
    files: list[dict] = []
    try:
        for table in dict.fromkeys(p.table for p in parts):
            files.extend(_merge_table(out, [p for p in parts if p.table == table], table, stream_id, period,
                                      piece, compression))
        with lock:
            store.append(state, {"kind": "publish", "period": period, "files": files, "parts": [p.path for p in parts]})
    except BaseException:
        for f in files:  # not recorded: withdraw them, the parts stay committed
            out.delete(f["path"])
        raise
    for p in parts:
        out.delete(p.path)
    return files


def _merge_table(out: OutputFS, parts: list[Part], table: str, stream_id: str, period: int, piece: int,
                 compression: str) -> list[dict]:
    """Copy ``parts`` (one table) into as few files as their schemas allow; returns the files."""
    groups: list[list[Part]] = []
    schema = None
    for p, s in zip(parts, _schemas(out, parts)):
        if groups and s.equals(schema, check_metadata=True):
            groups[-1].append(p)
        else:
            groups.append([p])
        schema = s
    files: list[dict] = []
    try:
        for n, group in enumerate(groups):
            rel = published_name(table, stream_id, period, piece, n)
            copy_parts(out, rel, group, compression)
            files.append({"table": table, "path": rel, "rows": sum(p.rows for p in group)})
    except BaseException:
        for f in files:
            out.delete(f["path"])
        raise
    return files


def _schemas(out: OutputFS, parts: list[Part]) -> list[pa.Schema]:
    """Each part's schema, with its metadata (read from the footers only)."""
    return [pq.read_schema(out.path(p.path), filesystem=out.fs) for p in parts]


def merge_parts(out: OutputFS, store: ManifestStore, state: StreamState, stream_id: str,
                *, compression: str = "zstd", lock: AbstractContextManager = nullcontext()) -> int:
    """Merge every `MERGE_FANOUT` unpublished parts of one table, period and level (see the module
    docstring); returns the merges done. ``lock`` as for `publish`."""
    merges, skip = 0, set()
    while True:
        groups: dict[tuple[str, int, int], list[Part]] = {}
        with lock:
            for p in state.parts:
                groups.setdefault((p.table, p.period, p.level), []).append(p)
        full = [(k, g[:MERGE_FANOUT]) for k, g in groups.items() if len(g) >= MERGE_FANOUT and k not in skip]
        if not full:
            return merges
        (table, period, level), parts = full[0]
        schemas = _schemas(out, parts)
        if any(not s.equals(schemas[0], check_metadata=True) for s in schemas):
            skip.add((table, period, level))  # another model's rows among them: published as they are
            continue
        rel = f"{PARTS_DIR}/{table}/stream_id={stream_id}/part-{state.seq + 1:08d}-{uuid.uuid4().hex[:8]}.parquet"
        copy_parts(out, rel, parts, compression)
        ids = None if parts[0].ids is None else IdSet(r for p in parts for r in p.ids or []).ranges()
        into = Part(rel, table, period, sum(p.rows for p in parts), ids, level + 1)
        try:
            with lock:
                store.append(state, {"kind": "merge", "parts": [p.path for p in parts], "into": vars(into)})
        except BaseException:
            out.delete(rel)
            raise
        for p in parts:
            out.delete(p.path)
        merges += 1


def retire(out: OutputFS, store: ManifestStore, state: StreamState, every_s: float, retain_days: float) -> list[int]:
    """Delete the published periods older than ``retain_days`` (see the module docstring); returns them."""
    if state.t_max is None:
        return []
    cutoff = state.t_max - retain_days * 86400.0
    done = []
    for k, per in sorted(state.periods.items()):
        if (k + 1) * every_s > cutoff:
            break
        if per.retired or not per.pieces or state.unpublished(k):
            continue
        store.append(state, {"kind": "retire", "period": k})
        for f in (f for piece in per.pieces for f in piece):
            out.delete(f["path"])
        done.append(k)
    return done


def stray_files(files: list[str], states: list[StreamState]) -> list[str]:
    """Which of ``files`` (paths under the table folders and `PARTS_DIR`) an open deletes: ours
    (a part, a published file, or a temporary file of either) that no stream's manifest names as
    live (parts of a commit that did not finish or already published, published files not recorded
    or retired, temporary files). Files of other names are left alone."""
    live = {p.path for st in states for p in st.parts} | {f["path"] for st in states for f in st.published()}
    return [rel for rel in files if _OURS.match(rel.rpartition("/")[2]) and rel not in live]
