"""The Parquet output writer: hive-partitioned tables, atomic part files and a commit manifest.

The rows and their schemas are in `pipeline.tables` (re-exported here: a caller writes both).

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
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.redact import redact_text
from pipeline.tables import SCHEMA_VERSION, TABLES, ErrorRow, FlowRow, StudentRow, WindowRow, to_arrow

MANIFEST_DIR = "_manifest"
META_SCHEMA_VERSION = b"perceiver_stream.schema_version"
META_MODEL = b"perceiver_stream.model"
META_CONFIG_HASH = b"perceiver_stream.config_hash"
_PART = re.compile(r"^part-\d{8}-[0-9a-f]{8}\.parquet$")
_TMP = re.compile(r"^\.part-\d{8}-[0-9a-f]{8}\.parquet\.tmp$")
_STREAM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


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
            tables = {name: to_arrow(name, rows) for name, rows in fresh.items() if rows}
            if errors:
                tables["errors"] = to_arrow("errors", errors)
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
            META_MODEL: redact_text(self.model_name).encode(),
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


__all__ = ["SCHEMA_VERSION", "ErrorRow", "FlowRow", "OutputWriter", "StudentRow", "WindowRow", "read_file_metadata"]
