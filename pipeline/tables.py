"""The output tables' rows: one dataclass per table, its Arrow schema, and rows as Arrow tables.

Tables (DESIGN "Outputs"), each also partitioned by ``stream_id`` in its folder name:

- ``windows``: one row per window: identity, media time (s), presence flags, top-k labels,
  the ``D``-float32 embedding, the model's name, and ``t_wall`` (UTC, µs; null when unknown: the
  wall clock of the window's last sample, see `pipeline.window.Window.t_wall`), the last column,
  added in place: parts written before it lack it and read back as null through a dataset
  given this schema;
- ``flow``: one row per window with two or more frames: ``height x width x 2`` float32 flow
  (dx right, dy down, pixels) stored row-major as ``list<float32>``, optionally a PNG frame;
- ``student``: the distilled student's ``D``-float32 embedding and its cosine to the teacher's;
- ``errors``: append-only problems (``kind`` = the `PipelineError` class name).

`pipeline.parquet.OutputWriter` writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from pipeline.errors import PipelineError
from pipeline.redact import redact_text

SCHEMA_VERSION = "1"
TABLES = ("windows", "flow", "student", "errors")
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
    t_wall: float | None = None  # epoch seconds (UTC) of the window's last sample, None when unknown


@dataclass
class FlowRow:
    """One ``flow`` row: ``H x W x 2`` forward flow of the window's last two frames.

    ``t`` is the later frame's time; ``frame`` optionally the earlier frame as PNG bytes (for
    the inspect job).
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
                pa.field("t_wall", pa.timestamp("us", tz="UTC")),
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


def to_arrow(table: str, rows: Sequence) -> pa.Table:
    """``rows`` (all of ``table``'s row class, at least one) as an Arrow table of `table_schema`."""
    builders = {"windows": _windows_table, "flow": _flow_table, "student": _student_table, "errors": _errors_table}
    if table not in builders:
        raise ValueError(f"unknown table {table!r}; expected one of {TABLES}")
    return builders[table](rows)


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
            pa.array([None if r.t_wall is None else round(r.t_wall * 1e6) for r in rows], pa.int64()).cast(
                pa.timestamp("us", tz="UTC")
            ),
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
            pa.array([redact_text(r.message) for r in rows], pa.string()),  # the last boundary before disk
        ],
        schema=table_schema("errors"),
    )
