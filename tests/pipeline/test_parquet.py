"""The Parquet writer: hive layout, schemas, metadata, commits, uniqueness across restarts, recovery.

Publishing, retention, full disks and crashes while publishing: test_publish.py; object stores:
test_object_store.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from pipeline.errors import NonFinitePoints, OutputError, PipelineError
from pipeline.manifest import ManifestStore
from pipeline.parquet import (
    SCHEMA_VERSION,
    ErrorRow,
    FlowRow,
    OutputWriter,
    StudentRow,
    WindowRow,
    read_file_metadata,
)
from pipeline.reader import open_dataset

D = 6


def wrow(k: int, *, model: str = "tiny") -> WindowRow:
    rng = np.random.default_rng(k)
    return WindowRow(
        window_id=k,
        t_start=0.5 * k,
        t_end=0.5 * k + 1.0,
        has_video=True,
        has_audio=k % 2 == 0,
        has_points=False,
        state_reset=k == 0,
        labels=[("warm-disc-metal", 0.75), ("cool-box-wood", 0.125)],
        embedding=rng.normal(size=D).astype(np.float32),
        model=model,
    )


def frow(k: int, h: int = 4, w: int = 5) -> FlowRow:
    return FlowRow(window_id=k, t=0.5 * k + 0.96, flow=np.random.default_rng(k).normal(size=(h, w, 2)).astype(np.float32))


def srow(k: int) -> StudentRow:
    return StudentRow(window_id=k, embedding=np.full(D, k, np.float32), cosine_to_teacher=0.9)


def writer(root: Path, **kw) -> OutputWriter:
    return OutputWriter(root, model_name="tiny", config_hash="abc123", **kw)


def dataset(root: Path, table: str) -> pa.Table:
    return ds.dataset(root / table, format="parquet", partitioning="hive").to_table()


def part_files(root: Path, table: str) -> list[Path]:
    return sorted((root / table).rglob("*.parquet*"))


def test_layout_schema_values_and_metadata(tmp_path):
    with writer(tmp_path) as w:
        assert w.write("cam0", [wrow(0), wrow(1)], flow=[frow(1)], student=[srow(0), srow(1)]) == [0, 1]
        w.write("sim1", [wrow(0)], flow=[frow(0, 3, 2)])
        w.write_errors("cam0", [NonFinitePoints("dropped 3", count=3, stream_id="cam0", source="x.bin")])
    for table in ("windows", "flow", "student", "errors"):
        files = part_files(tmp_path, table)
        assert files and all(f.parent.name.startswith("stream_id=") and f.name.startswith("part-") for f in files)
        meta = read_file_metadata(files[0])
        assert meta == {"schema_version": SCHEMA_VERSION, "model": "tiny", "config_hash": "abc123"}

    win = dataset(tmp_path, "windows")
    assert win.num_rows == 3
    s = win.schema
    assert s.field("window_id").type == pa.int64()
    assert s.field("t_start").type == pa.float64() and s.field("t_end").type == pa.float64()
    assert all(s.field(c).type == pa.bool_() for c in ("has_video", "has_audio", "has_points", "state_reset"))
    assert s.field("labels").type == pa.list_(pa.struct([("label", pa.string()), ("score", pa.float32())]))
    assert s.field("embedding").type == pa.list_(pa.float32(), D)
    assert s.field("model").type == pa.string()
    rows = {(r["stream_id"], r["window_id"]): r for r in win.to_pylist()}
    assert set(rows) == {("cam0", 0), ("cam0", 1), ("sim1", 0)}
    r = rows[("cam0", 1)]
    assert r["labels"] == [{"label": "warm-disc-metal", "score": 0.75}, {"label": "cool-box-wood", "score": 0.125}]
    np.testing.assert_array_equal(np.array(r["embedding"], np.float32), wrow(1).embedding)
    assert (r["has_audio"], r["state_reset"], r["t_end"]) == (False, False, 1.5)
    # stream_id lives only in the path
    assert "stream_id" not in pa.parquet.read_schema(part_files(tmp_path, "windows")[0]).names

    flow = dataset(tmp_path, "flow")
    assert flow.schema.field("flow").type == pa.list_(pa.float32())
    assert flow.schema.field("height").type == pa.int32() and flow.schema.field("width").type == pa.int32()
    for fr in flow.to_pylist():
        want = frow(fr["window_id"], fr["height"], fr["width"]).flow
        np.testing.assert_array_equal(np.array(fr["flow"], np.float32).reshape(fr["height"], fr["width"], 2), want)
    assert sorted((f["stream_id"], f["height"], f["width"]) for f in flow.to_pylist()) == [("cam0", 4, 5), ("sim1", 3, 2)]

    stu = dataset(tmp_path, "student")
    assert stu.schema.field("cosine_to_teacher").type == pa.float32()
    assert stu.num_rows == 2

    err = dataset(tmp_path, "errors")
    assert err.schema.field("t_wall").type == pa.timestamp("us", tz="UTC")
    (e,) = err.to_pylist()
    assert e["kind"] == "NonFinitePoints" and e["window_id"] is None and "dropped 3" in e["message"]


def test_duckdb_and_polars_read_the_tables(tmp_path):
    with writer(tmp_path) as w:
        w.write("a", [wrow(k) for k in range(3)], flow=[frow(k) for k in range(3)])
        w.write("b", [wrow(k) for k in range(2)])
    got = duckdb.sql(
        f"SELECT stream_id, count(*) AS n, max(window_id) AS last FROM "
        f"read_parquet('{tmp_path}/windows/*/*.parquet', hive_partitioning = true) GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert got == [("a", 3, 2), ("b", 2, 1)]
    n_flow = duckdb.sql(
        f"SELECT count(*) FROM read_parquet('{tmp_path}/flow/*/*.parquet', hive_partitioning = true) "
        f"WHERE len(flow) = height * width * 2"
    ).fetchall()[0][0]
    assert n_flow == 3
    df = pl.scan_parquet(f"{tmp_path}/windows/**/*.parquet", hive_partitioning=True).collect()
    assert sorted(zip(df["stream_id"].to_list(), df["window_id"].to_list())) == [
        ("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)
    ]


def test_committed_ids_survive_reopen_and_are_never_duplicated(tmp_path):
    with writer(tmp_path) as w:
        assert w.resume_from("cam0") == 0
        w.write("cam0", [wrow(k) for k in range(5)], flow=[frow(k) for k in range(5)])
    with writer(tmp_path) as w:
        assert w.committed("cam0") == set(range(5))
        assert w.committed("cam0", "flow") == set(range(5))
        assert w.resume_from("cam0") == 5
        # a replay of 3..7 commits only 5..7; a repeated id in one call counts once
        assert w.write("cam0", [wrow(k) for k in (3, 4, 5, 6, 6, 7)], flow=[frow(k) for k in range(3, 8)]) == [5, 6, 7]
        assert w.write("cam0", [wrow(2)], flow=[frow(2)]) == []
        # student rows may arrive in a later commit; each table is unique on its own
        w.write("cam0", student=[srow(1), srow(2)])
        w.write("cam0", student=[srow(2), srow(3)])
    for table, n in (("windows", 8), ("flow", 8), ("student", 3)):
        ids = dataset(tmp_path, table).column("window_id").to_pylist()
        assert len(ids) == len(set(ids)) == n, table


def test_resume_from_is_the_first_hole(tmp_path):
    with writer(tmp_path) as w:
        w.write("s", [wrow(k) for k in (0, 1, 2, 5, 6)])
        assert w.resume_from("s") == 3
        assert w.resume_from("other") == 0


def hidden_parts(root: Path, table: str) -> list[Path]:
    return sorted((root / "_parts" / table).rglob("*.parquet*"))


def test_orphan_parts_from_a_crash_before_the_manifest_are_removed(tmp_path):
    """A process dies after writing its part files but before its manifest record: on reopen
    those parts are deleted, so the rows are written once when the windows come again."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_parquet import wrow, frow, writer
        from pathlib import Path
        from pipeline.manifest import ManifestStore
        w = writer(Path({str(tmp_path)!r}))
        w.write("cam0", [wrow(0), wrow(1)], flow=[frow(0), frow(1)])
        ManifestStore.append = lambda *a: os._exit(3)
        w.write("cam0", [wrow(2), wrow(3)], flow=[frow(2), frow(3)])
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert len(hidden_parts(tmp_path, "windows")) == 2  # one committed part, one orphan
    assert not part_files(tmp_path, "windows")  # nothing published: the run died before its drain
    assert sorted(open_dataset(tmp_path, "windows").to_table().column("window_id").to_pylist()) == [0, 1]
    with writer(tmp_path) as w:
        assert len(hidden_parts(tmp_path, "windows")) == 1 and len(hidden_parts(tmp_path, "flow")) == 1
        assert w.committed("cam0") == {0, 1} and w.resume_from("cam0") == 2
        assert w.write("cam0", [wrow(k) for k in range(4)], flow=[frow(k) for k in range(4)]) == [2, 3]
    for table in ("windows", "flow"):
        assert sorted(dataset(tmp_path, table).column("window_id").to_pylist()) == [0, 1, 2, 3]
        assert not hidden_parts(tmp_path, table)  # all published at close


def test_temporary_and_stray_files_are_cleaned(tmp_path):
    with writer(tmp_path) as w:
        w.write("cam0", [wrow(0)])
    folder = tmp_path / "windows" / "stream_id=cam0"
    (folder / ".part-000000-001-00.parquet.tmp").write_bytes(b"half a file")
    (tmp_path / "flow" / "stream_id=ghost").mkdir(parents=True)
    (tmp_path / "flow" / "stream_id=ghost" / "part-000000-000-00.parquet").write_bytes(b"no manifest")
    (folder / "notes.txt").write_text("not ours")
    manifest = tmp_path / "_manifest" / "stream_id=cam0"
    (manifest / ".r0000000009.json.tmp").write_bytes(b'{"seq":9,"kind":"comm')
    with writer(tmp_path) as w:
        assert w.committed("cam0") == {0}
        assert not (folder / ".part-000000-001-00.parquet.tmp").exists()
        assert not list((tmp_path / "flow" / "stream_id=ghost").iterdir())
        assert (folder / "notes.txt").exists()
        assert [p.name for p in manifest.iterdir()] == ["s0000000001.json"]  # compacted at the publication
        assert w.write("cam0", [wrow(1)]) == [1]
    with writer(tmp_path) as w:
        assert w.committed("cam0") == {0, 1}


def test_a_failed_commit_leaves_nothing_behind(tmp_path, monkeypatch):
    with writer(tmp_path) as w:
        w.write("cam0", [wrow(0)])

        def full(*a):
            raise OutputError("no space left on the device")

        monkeypatch.setattr(ManifestStore, "append", full)
        with pytest.raises(OutputError):
            w.write("cam0", [wrow(1)], flow=[frow(1)])
        monkeypatch.undo()
        assert w.committed("cam0") == {0}
        assert open_dataset(tmp_path, "windows").to_table().column("window_id").to_pylist() == [0]
        assert not hidden_parts(tmp_path, "flow")
        assert w.write("cam0", [wrow(1)], flow=[frow(1)]) == [1]


def test_one_writer_per_folder(tmp_path):
    w = writer(tmp_path)
    with pytest.raises(PipelineError, match="another writer"):
        writer(tmp_path)
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write("cam0", [wrow(0)])
    writer(tmp_path).close()


def test_errors_are_append_only_with_nullable_window_ids(tmp_path):
    t = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    with writer(tmp_path) as w:
        w.write_errors("cam0", [ErrorRow("DecodeError", "bad packet", window_id=4, t_wall=t)])
        w.write_errors("cam0", [ErrorRow("DecodeError", "bad packet", window_id=4, t_wall=t)])
        w.write_errors("cam0", [ValueError("plain")])
    rows = dataset(tmp_path, "errors").to_pylist()
    assert len(rows) == 3
    assert sorted((r["kind"], r["window_id"]) for r in rows) == [("DecodeError", 4), ("DecodeError", 4), ("ValueError", None)]
    assert any(r["t_wall"] == t for r in rows)


def test_bad_input_is_refused(tmp_path):
    with writer(tmp_path) as w:
        with pytest.raises(ValueError, match="folder name"):
            w.write("a/b", [wrow(0)])
        with pytest.raises(ValueError, match="H x W x 2"):
            w.write("a", flow=[FlowRow(window_id=0, t=0.0, flow=np.zeros((4, 4)))])
        bad = wrow(1)
        bad.embedding = np.zeros(D + 1, np.float32)
        with pytest.raises(ValueError, match="different sizes"):
            w.write("a", [wrow(0), bad])
        assert w.committed("a") == set()
