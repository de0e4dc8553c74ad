"""The Parquet output writer: hive-partitioned tables, hidden committed parts, a manifest, and
large published files per period of media time.

The rows and their schemas are in `pipeline.tables` (re-exported here: a caller writes both).

Layout under the output folder (a local path or a `pyarrow.fs` URI, see `pipeline.outputfs`)::

    <out>/windows/stream_id=<id>/part-<period>-<piece>-<n>.parquet   published: what glob readers see
    <out>/flow/..., <out>/student/..., <out>/errors/...                 the same per table
    <out>/_parts/<table>/stream_id=<id>/part-<seq>-<token>.parquet     committed, not yet published
    <out>/_manifest/stream_id=<id>/r<seq>.json | s<seq>.json           the manifest (`pipeline.manifest`)
    <out>/_manifest/.lock (local disk) | <out>/_lease.json (object store)   one writer (`pipeline.ownership`)

``stream_id`` lives only in the folder name, as hive readers expect; pyarrow, DuckDB, Polars
and pandas read ``<out>/<table>/**/*.parquet`` with hive partitioning and see published rows
only, each once. `pipeline.reader.open_dataset` also reads the committed rows not yet published.

**Commit.** One `OutputWriter.write` call is one commit for one stream: its rows go to hidden
part files (one per table and period, each written under a temporary name and moved into place),
then one manifest record names them. A commit counts only once its record exists (one atomic
object write, also where rename is not atomic), so a window is committed exactly when all the
rows of that call (in every table) are. On open, files the manifest does not name are deleted,
so a restart never duplicates a row.

**Publishing** (`pipeline.publish`): after each commit (inside `write`, or with ``background`` on the
writer's `pipeline.maintenance` thread), the open period's hidden parts are merged
(a few per table at any time) and every *closed* period of the stream
(``publish_every_s`` of media time, a later window committed) is published as one file per
table; `finish` (a stream that ended), `close` and `publish` with ``everything=True`` (the
``compact`` command) also publish the open period. ``retain_days`` then deletes old periods, and the stream's
manifest is compacted into one snapshot whenever it publishes or has `COMPACT_EVERY` objects.

Rows for window ids already committed to a table are skipped, which makes ``(stream_id,
window_id)`` unique in ``windows``, ``flow`` and ``student`` across restarts; ``errors`` is
append-only. `OutputWriter.committed` gives a stream's committed window ids (``windows`` table)
and `OutputWriter.resume_from` the lowest id not committed (the first hole: a window that produced
no row may be re-read on resume; nothing is written twice).

Every file's metadata carries `SCHEMA_VERSION`, the model name and the config hash.

Plain loop::

    with OutputWriter("out", model_name="tiny", config_hash=config_hash(cfg)) as w:
        start = w.resume_from("cam0")
        for win in read_windows(..., start_window=start):
            w.write("cam0", [WindowRow(...)], flow=[FlowRow(...)])
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.errors import OutputError
from pipeline.maintenance import Maintenance
from pipeline.manifest import MANIFEST_DIR, KEYED_TABLES, IdSet, ManifestStore, StreamState, old_manifests, stream_ids
from pipeline.outputfs import OutputFS, open_output
from pipeline.ownership import LEASE_S, FolderLock, Lease, default_owner
from pipeline.partcopy import string_columns
from pipeline.publish import PARTS_DIR, closed, merge_parts, period_of, publish, retire, stray_files
from pipeline.redact import redact_text
from pipeline.tables import SCHEMA_VERSION, TABLES, ErrorRow, FlowRow, StudentRow, WindowRow, to_arrow

META_SCHEMA_VERSION = b"perceiver_stream.schema_version"
META_MODEL = b"perceiver_stream.model"
META_CONFIG_HASH = b"perceiver_stream.config_hash"
COMPACT_EVERY = 256  # manifest objects of a stream before it is compacted without a publication
_STREAM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class _Stream:
    store: ManifestStore
    state: StreamState


class OutputWriter:
    """Writes the output tables of many streams into one folder (see the module docstring).

    ``publish_every_s``: the period of media time published as one file per table (a stream keeps
    the period of its first commit);
    ``retain_days``: delete published periods that much media time older than a stream's latest
    window (None: keep all). ``owner`` names this writer in an object store's lease (default:
    host, pid and a random token); a writer with the same owner takes over its own live lease.
    ``background``: merges and publications after a commit run on a thread of the writer
    (`pipeline.maintenance`), so `write` returns once the rows are committed; an error there (a
    full disk) is raised by the next `write` or `renew`.
    Not safe for two processes at once (the folder is locked or leased); calls from several
    threads of one process are serialised.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        model_name: str,
        config_hash: str,
        compression: str = "zstd",
        publish_every_s: float = 3600.0,
        retain_days: float | None = None,
        owner: str | None = None,
        lease_s: float = LEASE_S,
        background: bool = False,
    ) -> None:
        if publish_every_s <= 0 or (retain_days is not None and retain_days <= 0):
            raise ValueError("publish_every_s and retain_days must be positive")
        self.out: OutputFS = open_output(root)
        self.model_name = model_name
        self.config_hash = config_hash
        self.compression = compression
        self.publish_every_s = float(publish_every_s)
        self.retain_days = retain_days
        self._mutex = threading.Lock()  # the streams' state: commits, and maintenance's reads and records
        self._maintaining = threading.Lock()  # one maintenance at a time; taken before _mutex, never inside it
        self._streams: dict[str, _Stream] = {}
        self._ended: set[str] = set()  # streams `finish`ed, no window since: publish their open period too
        self._owner = FolderLock(self.out) if self.out.local else Lease(self.out, owner or default_owner(), lease_s)
        self._closed = False
        try:
            self._recover()
        except BaseException:
            self._owner.release()
            raise
        self._maintenance = Maintenance(self._maintain_due) if background else None

    # -- opening ---------------------------------------------------------------------------

    def _recover(self) -> None:
        """Load every stream's manifest and delete the files it does not name (see `stray_files`)."""
        if old_manifests(self.out):
            raise OutputError("this output folder was written by an earlier perceiver-stream (a .jsonl manifest); "
                              "use a new output folder", source=self.out.where)
        for sid in stream_ids(self.out):
            store = ManifestStore(self.out, sid)
            self._streams[sid] = _Stream(store, store.load())
        files = [f for t in TABLES for base in (t, f"{PARTS_DIR}/{t}") for f in self.out.files(base)]
        for rel in stray_files(files, [s.state for s in self._streams.values()]):
            self.out.delete(rel)

    def _stream(self, stream_id: str) -> _Stream:
        if stream_id not in self._streams:
            self._streams[stream_id] = _Stream(ManifestStore(self.out, stream_id), StreamState())
        return self._streams[stream_id]

    # -- queries ---------------------------------------------------------------------------

    def streams(self) -> list[str]:
        """Streams with at least one commit."""
        return sorted(sid for sid, s in self._streams.items() if s.state.seq >= 0)

    def committed(self, stream_id: str, table: str = "windows") -> set[int]:
        """Window ids of ``stream_id`` committed to ``table`` (``windows`` by default)."""
        if table not in KEYED_TABLES:
            raise ValueError(f"committed ids are kept for windows, flow and student, not {table!r}")
        s = self._streams.get(stream_id)
        return set() if s is None else set(s.state.committed[table])

    def is_committed(self, stream_id: str, window_id: int, table: str = "windows") -> bool:
        """Whether ``window_id`` of ``stream_id`` is committed to ``table`` (no copy of the id set)."""
        s = self._streams.get(stream_id)
        return s is not None and window_id in s.state.committed[table]

    def resume_from(self, stream_id: str) -> int:
        """The lowest window id of ``stream_id`` not committed (0 for a new stream)."""
        s = self._streams.get(stream_id)
        return 0 if s is None else s.state.committed["windows"].first_missing()

    def state(self, stream_id: str) -> StreamState:
        """The manifest state of ``stream_id`` (read-only use: files, periods, parts)."""
        return self._stream(stream_id).state

    # -- writing ---------------------------------------------------------------------------

    def write(
        self,
        stream_id: str,
        windows: Sequence[WindowRow] = (),
        flow: Sequence[FlowRow] = (),
        student: Sequence[StudentRow] = (),
        errors: Sequence[ErrorRow] = (),
    ) -> list[int]:
        """Commit one batch of one stream's rows atomically, then publish what closed; returns the
        newly committed ``windows`` ids. Rows whose window id is already committed to their table,
        or repeated within the call, are skipped. An `OutputError` (a full disk) leaves the
        commit either whole or absent."""
        self._check_open()
        if not _STREAM_ID.match(stream_id):
            raise ValueError(f"stream id {stream_id!r} cannot be a folder name (letters, digits, _ . -)")
        if self._maintenance is not None:
            self._maintenance.check()
        with self._mutex:
            self._owner.renew()  # a writer that lost its lease must not commit
            s = self._stream(stream_id)
            state = s.state
            fresh = {
                "windows": _new_rows(windows, state.committed["windows"]),
                "flow": _new_rows(flow, state.committed["flow"]),
                "student": _new_rows(student, state.committed["student"]),
            }
            by_part = self._split(state, fresh, errors)
            if not by_part:
                return []
            t_max = max((r.t_start for r in fresh["windows"]), default=None)
            seq = state.seq + 1
            parts: list[dict] = []
            try:
                for (name, period), rows in by_part.items():
                    parts.append(self._write_part(name, stream_id, seq, period, rows))
                s.store.append(state, {"kind": "commit", "parts": parts, "t_max": t_max, "every_s": self._every(state)})
            except BaseException:
                for p in parts:  # not committed: take the parts back
                    self.out.delete(p["path"])
                raise
            if fresh["windows"]:  # the stream runs again (late student or errors rows leave it ended)
                self._ended.discard(stream_id)
        if self._maintenance is None:
            self._maintain_due(stream_id)
        else:
            self._maintenance.due(stream_id)
        return sorted(r.window_id for r in fresh["windows"])

    def _split(self, state: StreamState, fresh: dict[str, list], errors: Sequence[ErrorRow]) -> dict:
        """The call's rows grouped by ``(table, period)``, in table order."""
        every = self._every(state)
        own = {r.window_id: period_of(r.t_start, every) for r in fresh["windows"]}
        starts = [r.t_start for r in fresh["windows"]] + ([state.t_max] if state.t_max is not None else [])
        current = period_of(max(starts), every) if starts else 0  # the stream's latest period, for errors
        out: dict[tuple[str, int], list] = {}
        for name in ("windows", "flow", "student"):
            for r in fresh[name]:
                k = own[r.window_id] if r.window_id in own else state.period_of_id(r.window_id, current)
                out.setdefault((name, k), []).append(r)
        if errors:
            out[("errors", current)] = list(errors)
        return out

    def _every(self, state: StreamState) -> float:
        """The stream's period: as its first commit set it (a later ``publish_every_s`` applies to
        new streams only, so a period's number means one thing in a folder)."""
        return state.every_s if state.every_s is not None else self.publish_every_s

    def write_errors(self, stream_id: str, errors: Sequence[ErrorRow | BaseException]) -> None:
        """Append ``errors`` rows (rows or exceptions) for ``stream_id``."""
        rows = [e if isinstance(e, ErrorRow) else ErrorRow.from_error(e) for e in errors]
        if rows:
            self.write(stream_id, errors=rows)

    def _metadata(self) -> dict[bytes, bytes]:
        return {
            META_SCHEMA_VERSION: SCHEMA_VERSION.encode(),
            META_MODEL: redact_text(self.model_name).encode(),
            META_CONFIG_HASH: self.config_hash.encode(),
        }

    def _write_part(self, table: str, stream_id: str, seq: int, period: int, rows: list) -> dict:
        data = to_arrow(table, rows).replace_schema_metadata(self._metadata())
        rel = f"{PARTS_DIR}/{table}/stream_id={stream_id}/part-{seq:08d}-{uuid.uuid4().hex[:8]}.parquet"
        self.out.write_atomic(rel, lambda fh: pq.write_table(
            data, fh, compression=self.compression, use_dictionary=string_columns(data.schema)))
        ids = None if table == "errors" else IdSet([k, k] for k in (r.window_id for r in rows)).ranges()
        return {"path": rel, "table": table, "period": period, "rows": data.num_rows, "ids": ids}

    # -- publishing ------------------------------------------------------------------------

    def publish(self, stream_id: str | None = None, *, everything: bool = False) -> dict[str, dict[str, list[int]]]:
        """Publish the closed periods of ``stream_id`` (None: every stream), or with ``everything``
        every committed row (the open period too), then apply retention and compact the manifest.
        Returns, per stream, the periods ``published`` and ``retired``."""
        self._check_open()
        with self._mutex:
            ids = [sid for sid in ([stream_id] if stream_id is not None else list(self._streams)) if sid in self._streams]
        return {sid: self._maintain(sid, everything=everything) for sid in ids}

    def finish(self, stream_id: str) -> None:
        """``stream_id`` ended: publish every row it committed, the open period too, as `publish`
        with ``everything`` does; with ``background``, on the maintenance thread (this returns at
        once, and other streams' commits go on during the copy). Rows written after it (a late
        ``student`` row) are published as they commit, until a new ``windows`` row starts the
        stream again."""
        self._check_open()
        with self._mutex:
            if stream_id not in self._streams:
                return
            self._ended.add(stream_id)
        if self._maintenance is None:
            self._maintain_due(stream_id)
        else:
            self._maintenance.due(stream_id)

    def _maintain_due(self, stream_id: str) -> None:
        with self._mutex:
            everything = stream_id in self._ended
        self._maintain(stream_id, everything=everything)

    def _maintain(self, stream_id: str, *, everything: bool) -> dict[str, list[int]]:
        """Publish the due periods, merge parts, retire old periods and compact the manifest of one
        stream. The copies run without `_mutex` (commits go on); it guards each read and record."""
        with self._maintaining:
            with self._mutex:
                s = self._streams[stream_id]
                state, every = s.state, self._every(s.state)
                due = sorted({p.period for p in state.parts if everything or closed(state, p.period, every)})
            for k in due:
                publish(self.out, s.store, state, stream_id, k, compression=self.compression, lock=self._mutex)
            merge_parts(self.out, s.store, state, stream_id, compression=self.compression, lock=self._mutex)
            with self._mutex:
                gone = [] if self.retain_days is None else retire(self.out, s.store, state, every, self.retain_days)
                if due or gone or s.store.records >= COMPACT_EVERY:
                    s.store.compact(state)
            return {"published": due, "retired": gone}

    def renew(self) -> None:
        """Renew the object store lease when due (call it every few seconds); nothing locally.
        Raises what stopped the background maintenance, if anything did."""
        self._check_open()
        if self._maintenance is not None:
            self._maintenance.check()
        with self._mutex:
            self._owner.renew()

    # -- closing ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the OutputWriter is closed")

    def close(self, *, publish: bool = True) -> None:
        """Publish everything committed (unless ``publish=False``) and release the folder."""
        if self._closed:
            return
        try:
            if self._maintenance is not None:
                self._maintenance.drain()
            if publish:
                self.publish(everything=True)
        finally:
            if self._maintenance is not None:
                self._maintenance.stop()
            self._closed = True
            self._owner.release()

    def __enter__(self) -> "OutputWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(publish=exc[0] is None)


def _new_rows(rows: Sequence, done) -> list:
    """Rows whose window id is not in ``done``, first occurrence only."""
    seen: set[int] = set()
    out = []
    for r in rows:
        if r.window_id in done or r.window_id in seen:
            continue
        seen.add(r.window_id)
        out.append(r)
    return out


def read_file_metadata(path: str | Path) -> dict[str, str]:
    """Schema version, model name and config hash of one Parquet file (local path)."""
    meta = pq.read_schema(path).metadata or {}
    return {
        "schema_version": meta.get(META_SCHEMA_VERSION, b"").decode(),
        "model": meta.get(META_MODEL, b"").decode(),
        "config_hash": meta.get(META_CONFIG_HASH, b"").decode(),
    }


__all__ = [
    "MANIFEST_DIR", "SCHEMA_VERSION", "ErrorRow", "FlowRow", "OutputWriter", "StudentRow", "WindowRow",
    "read_file_metadata",
]
