"""The Parquet output writer: hive-partitioned tables, atomic part files and a commit manifest.

Layout under the output folder (DESIGN "Outputs")::

    <out>/windows/stream_id=<id>/part-<seq>-<token>.parquet
    <out>/flow/stream_id=<id>/part-....parquet
    <out>/student/stream_id=<id>/part-....parquet
    <out>/errors/stream_id=<id>/part-....parquet
    <out>/_manifest/stream_id=<id>.jsonl      commit log, one JSON line per commit

``stream_id`` lives only in the folder name, as hive readers expect; pyarrow, DuckDB, Polars
and pandas read each table folder with hive partitioning and skip names starting with ``_``/``.``.

**Commit protocol.** One `OutputWriter.write` call is one commit for one stream: each table's
rows go to a part file written as ``.part-*.tmp``, flushed and fsynced, then ``os.replace``-d to
its final name; then one line naming those parts and the window ids they hold is appended to
the stream's manifest and fsynced. A commit counts only once its manifest line is complete, so
a window is committed exactly when all the rows of that call (in every table) are. On open,
part files the manifest does not name (a crash between rename and manifest) and temporary files
are deleted, and a torn last manifest line is dropped, so a restart never duplicates a row.

Rows for window ids already committed to a table are skipped, which makes ``(stream_id,
window_id)`` unique in ``windows``, ``flow`` and ``student`` across restarts; ``errors`` is
append-only. `OutputWriter.committed` gives a stream's committed window ids (``windows`` table)
and `OutputWriter.resume_from` the lowest id not committed: ``max + 1`` when the ids are
contiguous from 0, else the first hole (ids above it are skipped when they come again). A window
that produced no row (no data) is such a hole, so a resume may re-read from it; nothing is written
twice.

One writer per output folder at a time (an exclusive ``flock`` on ``_manifest/.lock``).
Every part file's metadata carries `SCHEMA_VERSION`, the model name and the config hash.

Plain loop::

    with OutputWriter("out", model_name="tiny", config_hash=config_hash(cfg)) as w:
        start = w.resume_from("cam0")
        for win in read_windows(..., start_window=start):
            w.write("cam0", [WindowRow(...)], flow=[FlowRow(...)])
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError

SCHEMA_VERSION = "1"
TABLES = ("windows", "flow", "student", "errors")
MANIFEST_DIR = "_manifest"
META_SCHEMA_VERSION = b"perceiver_stream.schema_version"
META_MODEL = b"perceiver_stream.model"
META_CONFIG_HASH = b"perceiver_stream.config_hash"
_PART = re.compile(r"^part-\d{8}-[0-9a-f]{8}\.parquet$")
_TMP = re.compile(r"^\.part-\d{8}-[0-9a-f]{8}\.parquet\.tmp$")
_STREAM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

LABEL_TYPE = pa.struct([("label", pa.string()), ("score", pa.float32())])


@dataclass
class WindowRow:
    """One ``windows`` row: a window's identity, presence flags, top-k labels and embedding."""

    window_id: int
    t_start: float
    t_end: float
    has_video: bool
    has_audio: bool
    has_points: bool
    state_reset: bool
    labels: list[tuple[str, float]]  # top-k (label, score), best first
    embedding: np.ndarray  # D float32
    model: str


@dataclass
class FlowRow:
    """One ``flow`` row: ``H x W x 2`` forward flow of the window's last two frames.

    ``t`` is the later frame's time; ``frame`` optionally the earlier frame as PNG bytes (for
    `jobs.inspect`).
    """

    window_id: int
    t: float
    flow: np.ndarray
    frame: bytes | None = None


@dataclass
class StudentRow:
    """One ``student`` row: the distilled student's embedding and its cosine to the teacher's."""

    window_id: int
    embedding: np.ndarray
    cosine_to_teacher: float


@dataclass
class ErrorRow:
    """One ``errors`` row; ``kind`` is the `PipelineError` class name."""

    kind: str
    message: str
    window_id: int | None = None
    t_wall: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @classmethod
    def from_error(cls, error: BaseException, *, t_wall: datetime | None = None) -> "ErrorRow":
        """The row for an exception (its class name, message and window id when it has one)."""
        kind = error.kind if isinstance(error, PipelineError) else type(error).__name__
        row = cls(kind=kind, message=str(error), window_id=getattr(error, "window_id", None))
        if t_wall is not None:
            row.t_wall = t_wall
        return row


def table_schema(table: str, *, embedding_dim: int | None = None) -> pa.Schema:
    """The Arrow schema of one table (without the ``stream_id`` partition column).

    ``windows`` and ``student`` need ``embedding_dim`` for their fixed-size embedding column.
    """
    if table in ("windows", "student") and embedding_dim is None:
        raise ValueError(f"the {table} schema needs embedding_dim")
    wid = pa.field("window_id", pa.int64(), nullable=False)
    if table == "windows":
        return pa.schema(
            [
                wid,
                pa.field("t_start", pa.float64(), nullable=False),
                pa.field("t_end", pa.float64(), nullable=False),
                pa.field("has_video", pa.bool_(), nullable=False),
                pa.field("has_audio", pa.bool_(), nullable=False),
                pa.field("has_points", pa.bool_(), nullable=False),
                pa.field("state_reset", pa.bool_(), nullable=False),
                pa.field("labels", pa.list_(LABEL_TYPE), nullable=False),
                pa.field("embedding", pa.list_(pa.float32(), embedding_dim), nullable=False),
                pa.field("model", pa.string(), nullable=False),
            ]
        )
    if table == "flow":
        return pa.schema(
            [
                wid,
                pa.field("t", pa.float64(), nullable=False),
                pa.field("height", pa.int32(), nullable=False),
                pa.field("width", pa.int32(), nullable=False),
                pa.field("flow", pa.list_(pa.float32()), nullable=False),
                pa.field("frame", pa.binary()),
            ]
        )
    if table == "student":
        emb = pa.field("embedding", pa.list_(pa.float32(), embedding_dim), nullable=False)
        return pa.schema([wid, emb, pa.field("cosine_to_teacher", pa.float32(), nullable=False)])
    if table == "errors":
        return pa.schema(
            [
                pa.field("window_id", pa.int64()),
                pa.field("t_wall", pa.timestamp("us", tz="UTC"), nullable=False),
                pa.field("kind", pa.string(), nullable=False),
                pa.field("message", pa.string(), nullable=False),
            ]
        )
    raise ValueError(f"unknown table {table!r}; expected one of {TABLES}")


def _embeddings(rows: Sequence[WindowRow | StudentRow]) -> pa.FixedSizeListArray:
    emb = np.stack([np.asarray(r.embedding, dtype=np.float32).reshape(-1) for r in rows])
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), emb.shape[1])


def _embedding_dim(rows: Sequence[WindowRow | StudentRow], table: str) -> int:
    dims = {int(np.asarray(r.embedding).size) for r in rows}
    if len(dims) != 1:
        raise ValueError(f"{table} rows have embeddings of different sizes {sorted(dims)}")
    return dims.pop()


def _windows_table(rows: Sequence[WindowRow]) -> pa.Table:
    labels = pa.array(
        [[{"label": str(k), "score": float(s)} for k, s in r.labels] for r in rows], type=pa.list_(LABEL_TYPE)
    )
    schema = table_schema("windows", embedding_dim=_embedding_dim(rows, "windows"))
    return pa.Table.from_arrays(
        [
            pa.array([r.window_id for r in rows], pa.int64()),
            pa.array([r.t_start for r in rows], pa.float64()),
            pa.array([r.t_end for r in rows], pa.float64()),
            pa.array([r.has_video for r in rows], pa.bool_()),
            pa.array([r.has_audio for r in rows], pa.bool_()),
            pa.array([r.has_points for r in rows], pa.bool_()),
            pa.array([r.state_reset for r in rows], pa.bool_()),
            labels,
            _embeddings(rows),
            pa.array([r.model for r in rows], pa.string()),
        ],
        schema=schema,
    )


def _flow_table(rows: Sequence[FlowRow]) -> pa.Table:
    flows = [np.asarray(r.flow, dtype=np.float32) for r in rows]
    for r, f in zip(rows, flows):
        if f.ndim != 3 or f.shape[2] != 2:
            raise ValueError(f"flow of window {r.window_id} must be H x W x 2, got shape {f.shape}")
    offsets = np.concatenate([[0], np.cumsum([f.size for f in flows])]).astype(np.int32)
    values = pa.array(np.concatenate([f.reshape(-1) for f in flows]), type=pa.float32())
    return pa.Table.from_arrays(
        [
            pa.array([r.window_id for r in rows], pa.int64()),
            pa.array([r.t for r in rows], pa.float64()),
            pa.array([f.shape[0] for f in flows], pa.int32()),
            pa.array([f.shape[1] for f in flows], pa.int32()),
            pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values),
            pa.array([r.frame for r in rows], pa.binary()),
        ],
        schema=table_schema("flow"),
    )


def _student_table(rows: Sequence[StudentRow]) -> pa.Table:
    return pa.Table.from_arrays(
        [
            pa.array([r.window_id for r in rows], pa.int64()),
            _embeddings(rows),
            pa.array([r.cosine_to_teacher for r in rows], pa.float32()),
        ],
        schema=table_schema("student", embedding_dim=_embedding_dim(rows, "student")),
    )


def _errors_table(rows: Sequence[ErrorRow]) -> pa.Table:
    def utc(t: datetime) -> datetime:
        return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)

    return pa.Table.from_arrays(
        [
            pa.array([r.window_id for r in rows], pa.int64()),
            pa.array([utc(r.t_wall) for r in rows], pa.timestamp("us", tz="UTC")),
            pa.array([r.kind for r in rows], pa.string()),
            pa.array([r.message for r in rows], pa.string()),
        ],
        schema=table_schema("errors"),
    )


class OutputWriter:
    """Writes the output tables of many streams into one folder (see the module docstring).

    Not safe for two processes at once (the folder is locked); calls from several threads of
    one process are serialised.
    """

    def __init__(
        self, root: str | Path, *, model_name: str, config_hash: str, compression: str = "zstd"
    ) -> None:
        self.root = Path(root)
        self.model_name = model_name
        self.config_hash = config_hash
        self.compression = compression
        self._mutex = threading.Lock()
        self._committed: dict[str, dict[str, set[int]]] = {}
        self._seq: dict[str, int] = {}
        (self.root / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(self.root / MANIFEST_DIR / ".lock", "a")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            raise PipelineError(
                "another writer has this output folder open; use another --output", source=str(self.root)
            ) from None
        self._closed = False
        self._recover()

    # -- opening ---------------------------------------------------------------------------

    def _manifest_path(self, stream_id: str) -> Path:
        return self.root / MANIFEST_DIR / f"stream_id={stream_id}.jsonl"

    def _recover(self) -> None:
        """Load every manifest, drop a torn last line, delete orphan and temporary parts."""
        referenced: set[str] = set()
        for path in sorted((self.root / MANIFEST_DIR).glob("stream_id=*.jsonl")):
            sid = path.name[len("stream_id=") : -len(".jsonl")]
            records, torn = self._read_manifest(path)
            if torn:
                self._rewrite_manifest(path, records)
            tables = self._committed.setdefault(sid, {t: set() for t in TABLES if t != "errors"})
            for rec in records:
                referenced.update(rec["parts"])
                for table, ids in rec["ids"].items():
                    tables[table].update(ids)
            self._seq[sid] = len(records)
        for table in TABLES:
            for part_dir in (self.root / table).glob("stream_id=*"):
                for f in part_dir.iterdir():
                    rel = f"{table}/{part_dir.name}/{f.name}"
                    if _TMP.match(f.name) or (_PART.match(f.name) and rel not in referenced):
                        f.unlink()

    @staticmethod
    def _read_manifest(path: Path) -> tuple[list[dict], bool]:
        records, torn = [], False
        lines = path.read_bytes().split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if i >= len(lines) - 2:  # only the last line can be torn by a crash mid-append
                    torn = True
                    continue
                raise PipelineError(f"manifest line {i + 1} is corrupt", source=str(path)) from None
            records.append(rec)
        return records, torn

    @staticmethod
    def _rewrite_manifest(path: Path, records: list[dict]) -> None:
        tmp = path.with_name("." + path.name + ".tmp")
        with open(tmp, "w") as fh:
            fh.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    # -- queries ---------------------------------------------------------------------------

    def streams(self) -> list[str]:
        """Streams with at least one commit."""
        return sorted(self._committed)

    def committed(self, stream_id: str, table: str = "windows") -> set[int]:
        """Window ids of ``stream_id`` committed to ``table`` (``windows`` by default)."""
        if table not in TABLES or table == "errors":
            raise ValueError(f"committed ids are kept for windows, flow and student, not {table!r}")
        return set(self._committed.get(stream_id, {}).get(table, set()))

    def resume_from(self, stream_id: str) -> int:
        """The lowest window id of ``stream_id`` not committed (0 for a new stream)."""
        done = self._committed.get(stream_id, {}).get("windows", set())
        k = 0
        while k in done:
            k += 1
        return k

    # -- writing ---------------------------------------------------------------------------

    def write(
        self,
        stream_id: str,
        windows: Sequence[WindowRow] = (),
        flow: Sequence[FlowRow] = (),
        student: Sequence[StudentRow] = (),
        errors: Sequence[ErrorRow] = (),
    ) -> list[int]:
        """Commit one batch of one stream's rows atomically; returns the newly committed
        ``windows`` ids. Rows whose window id is already committed to their table, or repeated
        within the call, are skipped."""
        self._check_open()
        if not _STREAM_ID.match(stream_id):
            raise ValueError(f"stream id {stream_id!r} cannot be a folder name (letters, digits, _ . -)")
        with self._mutex:
            done = self._committed.get(stream_id, {t: set() for t in TABLES if t != "errors"})
            fresh = {
                "windows": _new_rows(windows, done["windows"]),
                "flow": _new_rows(flow, done["flow"]),
                "student": _new_rows(student, done["student"]),
            }
            builders = {"windows": _windows_table, "flow": _flow_table, "student": _student_table}
            tables = {name: builders[name](rows) for name, rows in fresh.items() if rows}
            if errors:
                tables["errors"] = _errors_table(errors)
            if not tables:
                return []
            seq = self._seq.get(stream_id, 0)
            parts: list[str] = []
            try:
                for name, t in tables.items():
                    parts.append(self._write_part(name, stream_id, seq, t))
                record = {
                    "seq": seq,
                    "parts": parts,
                    "ids": {name: sorted(r.window_id for r in rows) for name, rows in fresh.items() if rows},
                    "errors": len(errors),
                }
                self._append_manifest(stream_id, record)
            except BaseException:
                # not committed: take the renamed parts back so readers never see them twice
                for rel in parts:
                    (self.root / rel).unlink(missing_ok=True)
                raise
            self._seq[stream_id] = seq + 1
            self._committed[stream_id] = done
            for name, ids in record["ids"].items():
                done[name].update(ids)
            return record["ids"].get("windows", [])

    def write_errors(self, stream_id: str, errors: Sequence[ErrorRow | BaseException]) -> None:
        """Append ``errors`` rows (rows or exceptions) for ``stream_id``."""
        rows = [e if isinstance(e, ErrorRow) else ErrorRow.from_error(e) for e in errors]
        if rows:
            self.write(stream_id, errors=rows)

    def _metadata(self) -> dict[bytes, bytes]:
        return {
            META_SCHEMA_VERSION: SCHEMA_VERSION.encode(),
            META_MODEL: self.model_name.encode(),
            META_CONFIG_HASH: self.config_hash.encode(),
        }

    def _write_part(self, table: str, stream_id: str, seq: int, data: pa.Table) -> str:
        folder = self.root / table / f"stream_id={stream_id}"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{seq:08d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = folder / f".{name}.tmp"
        data = data.replace_schema_metadata(self._metadata())
        with open(tmp, "wb") as fh:
            pq.write_table(data, fh, compression=self.compression, use_dictionary=_string_columns(data.schema))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / name)
        _fsync_dir(folder)
        return f"{table}/{folder.name}/{name}"

    def _append_manifest(self, stream_id: str, record: dict) -> None:
        path = self._manifest_path(stream_id)
        with open(path, "ab") as fh:
            fh.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())

    # -- closing ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the OutputWriter is closed")

    def close(self) -> None:
        """Release the folder (every `write` has already committed; nothing is buffered)."""
        if not self._closed:
            self._closed = True
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()

    def __enter__(self) -> "OutputWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _new_rows(rows: Sequence, done: set[int]) -> list:
    """Rows whose window id is not yet committed, first occurrence only."""
    seen: set[int] = set()
    out = []
    for r in rows:
        if r.window_id in done or r.window_id in seen:
            continue
        seen.add(r.window_id)
        out.append(r)
    return out


def _string_columns(schema: pa.Schema) -> list[str]:
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file_metadata(path: str | Path) -> dict[str, str]:
    """Schema version, model name and config hash of one part file."""
    meta = pq.read_schema(path).metadata or {}
    return {
        "schema_version": meta.get(META_SCHEMA_VERSION, b"").decode(),
        "model": meta.get(META_MODEL, b"").decode(),
        "config_hash": meta.get(META_CONFIG_HASH, b"").decode(),
    }
