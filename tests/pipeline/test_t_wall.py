"""``t_wall``: a window's wall clock from a file's creation_time or a sample's arrival, and the
``windows`` table's column, added so that parts written before it still read (as null)."""

from __future__ import annotations

from datetime import datetime, timezone

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from clips import write_clip
from pipeline import read_windows
from pipeline.parquet import OutputWriter, WindowRow
from pipeline.sources.base import AudioChunk, VideoFrame
from pipeline.tables import table_schema
from pipeline.windowing import windows

CREATED = datetime(2026, 3, 4, 14, 5, tzinfo=timezone.utc)


def test_a_file_with_creation_time_gives_recording_time(tmp_path):
    stamped = write_clip(tmp_path / "cam3.mp4", seconds=2, metadata={"creation_time": "2026-03-04T14:05:00.000000Z"})
    plain = write_clip(tmp_path / "plain.mp4", seconds=2)
    ws = list(read_windows({"id": "cam3", "video": str(stamped), "audio": "same"}))
    assert len(ws) == 3
    for w in ws:  # the window's last sample ends at its t_end or within the frame that crosses it
        assert 0 <= w.t_wall - (CREATED.timestamp() + w.t_end) <= 0.04 + 1e-6
    assert all(w.t_wall is None for w in read_windows({"id": "p", "video": str(plain), "audio": "same"}))


def test_a_window_takes_its_last_samples_wall_clock():
    frames = [VideoFrame(t=i / 10, duration=0.1, image=np.zeros((2, 2, 3), np.uint8), t_wall=1000 + i / 10)
              for i in range(20)]
    # 0.4 s audio chunks arriving when their last sample did; the window takes part of one.
    chunks = [AudioChunk(t=0.4 * j, rate=10, samples=np.zeros((4, 1), np.float32), t_wall=1000.4 + 0.4 * j + 0.05)
              for j in range(5)]
    ws = list(windows("s", {"video": iter(frames), "audio": iter(chunks)}, seconds=1.0, hop=0.5))
    # Window [0.5, 1.5): its last frame (1.4) arrived at 1001.4; its audio ends in the chunk
    # [1.2, 1.6), which arrived at 1001.65, with sample 1.4 (the chunk's last sample, 1.5, left
    # out: 1001.65 - 0.1). The later of the two.
    w = ws[1]
    assert (w.t_start, w.t_end) == (0.5, 1.5)
    assert abs(w.t_wall - 1001.55) < 1e-9
    assert list(windows("s", {"video": iter([VideoFrame(0.0, 1.0, np.zeros((1, 1, 3), np.uint8))])},
                        seconds=1.0, hop=0.5))[0].t_wall is None


def _row(k: int, t_wall: float | None) -> WindowRow:
    return WindowRow(window_id=k, t_start=0.5 * k, t_end=0.5 * k + 1, has_video=True, has_audio=False,
                     has_points=False, state_reset=k == 0, labels=[("a", 1.0)],
                     embedding=np.zeros(4, np.float32), model="tiny", t_wall=t_wall)


def test_windows_written_before_the_column_still_read_and_resume(tmp_path):
    with OutputWriter(tmp_path, model_name="tiny", config_hash="h") as w:
        w.write("cam3", [_row(0, None), _row(1, None)])
    # Make that part an old one: the schema before t_wall.
    (old,) = (tmp_path / "windows").rglob("*.parquet")
    pq.write_table(pq.read_table(old).drop_columns(["t_wall"]), old)
    with OutputWriter(tmp_path, model_name="tiny", config_hash="h") as w:
        assert w.resume_from("cam3") == 2
        w.write("cam3", [_row(2, CREATED.timestamp() + 1.5)])
    schema = table_schema("windows", embedding_dim=4)
    assert schema.field("t_wall").type == pa.timestamp("us", tz="UTC") and schema.field("t_wall").nullable
    got = ds.dataset(tmp_path / "windows", schema=schema, format="parquet").to_table().sort_by("window_id")
    assert got.column("t_wall").to_pylist() == [None, None, datetime(2026, 3, 4, 14, 5, 1, 500000, tzinfo=timezone.utc)]
    n = duckdb.sql(
        f"SELECT count(*) FROM read_parquet('{tmp_path}/windows/*/*.parquet', union_by_name = true) "
        "WHERE t_wall BETWEEN TIMESTAMPTZ '2026-03-04 14:05:00+00' AND TIMESTAMPTZ '2026-03-04 14:06:00+00'"
    ).fetchall()[0][0]
    assert n == 1
