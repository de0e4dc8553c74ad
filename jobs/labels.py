"""Label tables: which label each stream has over which media-time span.

A table (CSV or Parquet) has the columns ``stream_id, t_start, t_end, label`` (media seconds,
label a string). `read_labels` validates it against the streams it labels; `LabelTable.of`
gives a window the label that covers more than half of it (spans of the same label add up), or
None. The class names are the table's distinct labels, sorted.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import ConfigError

COLUMNS = ("stream_id", "t_start", "t_end", "label")


@dataclass(frozen=True)
class Span:
    """One row of a table: ``label`` over ``[t_start, t_end)`` of stream ``stream_id``."""

    stream_id: str
    t_start: float
    t_end: float
    label: str


class LabelTable:
    """The validated spans of a label table, by stream."""

    def __init__(self, spans: list[Span]) -> None:
        self.by_stream: dict[str, list[Span]] = defaultdict(list)
        for s in spans:
            self.by_stream[s.stream_id].append(s)
        self.class_names: tuple[str, ...] = tuple(sorted({s.label for s in spans}))

    def of(self, stream_id: str, t_start: float, t_end: float) -> str | None:
        """The label covering more than half of ``[t_start, t_end)``, or None."""
        cover: dict[str, float] = defaultdict(float)
        for s in self.by_stream.get(stream_id, ()):
            cover[s.label] += max(0.0, min(t_end, s.t_end) - max(t_start, s.t_start))
        best = max(cover, key=cover.__getitem__, default=None)
        return best if best is not None and cover[best] > 0.5 * (t_end - t_start) else None


def _read_table(path: Path) -> pa.Table:
    try:
        if path.suffix.lower() == ".parquet":
            return pq.read_table(path)
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={"stream_id": pa.string(), "label": pa.string()}))
    except (OSError, pa.ArrowInvalid) as e:
        raise ConfigError(f"label table does not read: {e}", source=str(path)) from None


def read_labels(path: str | Path, stream_ids: list[str]) -> LabelTable:
    """The label table at ``path`` (``.csv`` or ``.parquet``) for streams ``stream_ids``.

    Raises ConfigError naming the row (numbered from 1, the header not counted) for a missing
    column, an unknown stream, an empty label, ``t_end <= t_start``, or spans of one stream that
    overlap with different labels.
    """
    path = Path(path)
    table = _read_table(path)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ConfigError(f"label table lacks columns {missing} (needs {list(COLUMNS)})", source=str(path))
    rows = table.select(list(COLUMNS)).to_pylist()
    known = set(stream_ids)
    spans: list[Span] = []
    for i, r in enumerate(rows, start=1):
        where = f"row {i} ({r['stream_id']}, {r['t_start']}, {r['t_end']}, {r['label']})"
        if r["stream_id"] not in known:
            raise ConfigError(f"{where}: unknown stream {r['stream_id']!r}; the data's streams are "
                              f"{sorted(known)}", source=str(path))
        if r["label"] is None or not str(r["label"]).strip():
            raise ConfigError(f"{where}: empty label", source=str(path))
        try:
            t0, t1 = float(r["t_start"]), float(r["t_end"])
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: t_start and t_end must be numbers (media seconds)", source=str(path)) from None
        if not t1 > t0:
            raise ConfigError(f"{where}: t_end must be after t_start", source=str(path))
        spans.append(Span(str(r["stream_id"]), t0, t1, str(r["label"])))
    _check_overlaps(spans, path)
    return LabelTable(spans)


def _check_overlaps(spans: list[Span], path: Path) -> None:
    order = sorted(range(len(spans)), key=lambda i: (spans[i].stream_id, spans[i].t_start))
    active: list[int] = []  # earlier rows of the same stream that end after the current one starts
    for b in order:
        sb = spans[b]
        active = [a for a in active if spans[a].stream_id == sb.stream_id and spans[a].t_end > sb.t_start]
        for a in active:
            sa = spans[a]
            if sa.label != sb.label:
                raise ConfigError(f"row {b + 1} ({sb.label!r} from {sb.t_start} s) overlaps row {a + 1} "
                                  f"({sa.label!r} until {sa.t_end} s) of stream {sa.stream_id!r} with another "
                                  "label", source=str(path))
        active.append(b)
