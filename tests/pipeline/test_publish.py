"""Publishing committed rows as large files per period of media time: what glob readers and the
project reader see, crashes at each step of a publication, retention, a full disk, the file count
after 24 hours of media time, and the ``compact`` command."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

import pipeline.partcopy
import run_pipeline
from paths import REPO
from pipeline.errors import OutputError
from pipeline.outputfs import OutputFS
from pipeline.parquet import ErrorRow, FlowRow, OutputWriter, WindowRow
from pipeline.reader import open_dataset

HOP = 5.0  # media seconds between windows (t_start = HOP * window_id)


def wrow(k: int) -> WindowRow:
    return WindowRow(k, HOP * k, HOP * k + 1.0, True, False, False, k == 0, [("a", 0.5)],
                     np.full(2, k, np.float32), "tiny")


def frow(k: int) -> FlowRow:
    return FlowRow(k, HOP * k + 0.9, np.full((2, 2, 2), k, np.float32))


def writer(root: Path, **kw) -> OutputWriter:
    return OutputWriter(root, model_name="tiny", config_hash="h", **kw)


def glob_ids(root: Path, table: str = "windows") -> list[tuple[str, int]]:
    """What a plain glob reader sees: (stream_id, window_id) rows, sorted, duplicates kept."""
    if not list((root / table).rglob("*.parquet")):
        return []
    rows = duckdb.sql(f"select stream_id, window_id from read_parquet('{root}/{table}/**/*.parquet', "
                      "hive_partitioning = true)").fetchall()
    return sorted(rows)


def reader_ids(root: Path, table: str = "windows") -> list[tuple[str, int]]:
    t = open_dataset(root, table).to_table(columns=["stream_id", "window_id"])
    return sorted(zip(t.column("stream_id").to_pylist(), t.column("window_id").to_pylist()))


def visible_files(root: Path, table: str, sid: str) -> list[str]:
    return sorted(p.name for p in (root / table / f"stream_id={sid}").glob("*.parquet"))


def test_closed_periods_are_published_once_and_the_reader_sees_every_committed_row(tmp_path):
    # P = 60 s: period k holds windows 12k .. 12k+11
    with writer(tmp_path, publish_every_s=60) as w:
        w.write("cam0", [wrow(k) for k in range(10)], flow=[frow(k) for k in range(10)])
        assert glob_ids(tmp_path) == []  # period 0 is still open
        assert reader_ids(tmp_path) == [("cam0", k) for k in range(10)]
        w.write("cam0", [wrow(k) for k in range(10, 30)], flow=[frow(k) for k in range(10, 30)])
        w.write_errors("cam0", [ErrorRow("DecodeError", "bad packet", window_id=29)])
        # periods 0 and 1 closed (window 24 starts at 120 s): published; period 2 is not
        assert glob_ids(tmp_path) == [("cam0", k) for k in range(24)]
        assert glob_ids(tmp_path, "flow") == [("cam0", k) for k in range(24)]
        assert reader_ids(tmp_path) == [("cam0", k) for k in range(30)]
        assert visible_files(tmp_path, "windows", "cam0") == ["part-000000-000-00.parquet", "part-000001-000-00.parquet"]
        assert {p.period for p in w.state("cam0").parts} == {2}  # the published periods' parts are gone
        ds = open_dataset(tmp_path, "windows")
        got = duckdb.from_arrow(ds).aggregate("count(*), count(distinct window_id)").fetchall()
        assert got == [(30, 30)]
        df = pl.scan_pyarrow_dataset(ds).filter(pl.col("window_id") >= 20).select("stream_id", "window_id").collect()
        assert df["window_id"].to_list() == list(range(20, 30)) and set(df["stream_id"]) == {"cam0"}
        assert len(list((tmp_path / "_manifest" / "stream_id=cam0").iterdir())) <= 2  # compacted: snapshot + record
    # close publishes the open period too; the errors row belongs to the period it was committed in
    assert glob_ids(tmp_path) == [("cam0", k) for k in range(30)]
    assert glob_ids(tmp_path, "errors") == [("cam0", 29)]
    assert not list((tmp_path / "_parts").rglob("*.parquet"))


def test_an_ended_stream_is_published_and_a_resume_adds_a_piece(tmp_path):
    with writer(tmp_path, publish_every_s=60) as w:
        w.write("a", [wrow(k) for k in range(5)])
        w.write("b", [wrow(k) for k in range(3)])
        assert w.publish("a", everything=True) == {"a": {"published": [0], "retired": []}}
        assert glob_ids(tmp_path) == [("a", k) for k in range(5)]
    with writer(tmp_path, publish_every_s=60) as w:  # a resume continues the drained period 0
        assert w.resume_from("a") == 5
        w.write("a", [wrow(k) for k in range(3, 15)])
        assert glob_ids(tmp_path) == [("a", k) for k in range(12)] + [("b", k) for k in range(3)]
    assert glob_ids(tmp_path) == [("a", k) for k in range(15)] + [("b", k) for k in range(3)]
    assert visible_files(tmp_path, "windows", "a") == [
        "part-000000-000-00.parquet", "part-000000-001-00.parquet", "part-000001-000-00.parquet"]


def test_a_glob_reader_running_during_publishing_never_sees_a_duplicate(tmp_path):
    seen: list[tuple[int, int]] = []
    failed: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        con = duckdb.connect()
        while not stop.is_set():
            if list((tmp_path / "windows").rglob("*.parquet")):
                try:
                    seen.append(con.sql(f"select count(*), count(distinct window_id) from read_parquet("
                                        f"'{tmp_path}/windows/**/*.parquet')").fetchall()[0])
                except duckdb.Error as exc:
                    failed.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        with writer(tmp_path, publish_every_s=20) as w:
            for start in range(0, 240, 6):
                w.write("cam0", [wrow(k) for k in range(start, start + 6)])
    finally:
        stop.set()
        reader.join()
    assert not failed and seen and all(n == distinct for n, distinct in seen)
    assert seen[-1][0] <= 240 and glob_ids(tmp_path) == [("cam0", k) for k in range(240)]


CRASH = textwrap.dedent(
    """
    import os
    import numpy as np
    from pipeline.manifest import ManifestStore
    from pipeline.outputfs import OutputFS
    from pipeline.parquet import OutputWriter, WindowRow
    def wrow(k):
        return WindowRow(k, 5.0 * k, 5.0 * k + 1.0, True, False, False, k == 0, [], np.zeros(2, np.float32), "tiny")
    point = {point!r}
    w = OutputWriter({root!r}, model_name="tiny", config_hash="h", publish_every_s=60)
    w.write("cam0", [wrow(k) for k in range(12)])  # period 0, still open
    if point == "writing the published file":
        real = OutputFS._write
        OutputFS._write = lambda self, rel, fill: os._exit(3) if rel.startswith("windows/") else real(self, rel, fill)
    elif point == "before the manifest record":
        real = ManifestStore.append
        ManifestStore.append = lambda self, st, rec: os._exit(3) if rec["kind"] == "publish" else real(self, st, rec)
    elif point == "before the parts are deleted":
        real = OutputFS.delete
        OutputFS.delete = lambda self, rel: os._exit(3) if rel.startswith("_parts/") else real(self, rel)
    elif point == "during the manifest compaction":
        real = OutputFS.delete
        OutputFS.delete = lambda self, rel: os._exit(3) if rel.startswith("_manifest/") else real(self, rel)
    w.write("cam0", [wrow(12), wrow(13)])  # closes period 0: publishes it
    """
)


@pytest.mark.parametrize("point, glob_sees, after_open", [
    ("writing the published file", 0, 0),
    ("before the manifest record", 12, 0),  # a visible file no manifest names: rows 0..11 once, withdrawn on open
    ("before the parts are deleted", 12, 12),
    ("during the manifest compaction", 12, 12),
])
def test_a_crash_at_each_step_of_a_publication(tmp_path, point, glob_sees, after_open):
    script = CRASH.format(root=str(tmp_path), point=point)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 3, proc.stderr
    assert glob_ids(tmp_path) == [("cam0", k) for k in range(glob_sees)]  # each row at most once
    assert reader_ids(tmp_path) == [("cam0", k) for k in range(14)]  # every committed row once
    with writer(tmp_path, publish_every_s=60) as w:
        assert w.resume_from("cam0") == 14
        assert glob_ids(tmp_path) == [("cam0", k) for k in range(after_open)]
        assert reader_ids(tmp_path) == [("cam0", k) for k in range(14)]
        w.publish()  # period 0 is closed
        assert glob_ids(tmp_path) == [("cam0", k) for k in range(12)]
        assert not list(tmp_path.rglob("*.tmp"))
    assert glob_ids(tmp_path) == reader_ids(tmp_path) == [("cam0", k) for k in range(14)]
    assert not list((tmp_path / "_parts").rglob("*.parquet"))


def test_hidden_parts_of_the_open_period_are_merged_and_read_once(tmp_path):
    """100 commits of one window (a live stream committing every 5 s): the parts are merged 8 at a
    time per level, 100 = 1 x 64 + 4 x 8 + 4, so 9 parts per table are left."""
    with writer(tmp_path, publish_every_s=3600) as w:
        for k in range(100):
            w.write("cam0", [wrow(k)], flow=[frow(k)])
        for table in ("windows", "flow"):
            parts = sorted(p.level for p in w.state("cam0").parts if p.table == table)
            assert parts == [0] * 4 + [1] * 4 + [2], table
            assert len(list((tmp_path / "_parts" / table).rglob("*.parquet"))) == 9
        assert reader_ids(tmp_path) == reader_ids(tmp_path, "flow") == [("cam0", k) for k in range(100)]
        assert glob_ids(tmp_path) == []
    assert glob_ids(tmp_path) == [("cam0", k) for k in range(100)]
    assert visible_files(tmp_path, "flow", "cam0") == ["part-000000-000-00.parquet"]


def test_merges_and_publications_copy_row_group_by_row_group(tmp_path, monkeypatch):
    """With row groups of about 3 flow rows, a level-2 part holds many row groups; the publication
    reads them one at a time and keeps every row, in window order, in row groups of that size."""
    monkeypatch.setattr(pipeline.partcopy, "ROW_GROUP_BYTES", 3 * frow(0).flow.nbytes + 1)
    with writer(tmp_path, publish_every_s=3600) as w:
        for k in range(64):
            w.write("cam0", [wrow(k)], flow=[frow(k)])
        (merged,) = [p for p in w.state("cam0").parts if p.table == "flow"]
        assert merged.level == 2
        assert pq.ParquetFile(tmp_path / merged.path).num_row_groups > 8
    published = pq.ParquetFile(tmp_path / "flow" / "stream_id=cam0" / "part-000000-000-00.parquet")
    sizes = [published.metadata.row_group(i).num_rows for i in range(published.num_row_groups)]
    assert sum(sizes) == 64 and max(sizes) <= 6
    assert published.read(columns=["window_id"]).column(0).to_pylist() == list(range(64))


MERGE_CRASH = textwrap.dedent(
    """
    import os
    import numpy as np
    from pipeline.manifest import ManifestStore
    from pipeline.outputfs import OutputFS
    from pipeline.parquet import OutputWriter, WindowRow
    w = OutputWriter({root!r}, model_name="tiny", config_hash="h")
    for k in range(8):
        if k == 7 and {point!r} == "before the merge record":
            real = ManifestStore.append
            ManifestStore.append = lambda self, st, rec: os._exit(3) if rec["kind"] == "merge" else real(self, st, rec)
        if k == 7 and {point!r} == "before the merged parts are deleted":
            real = OutputFS.delete
            OutputFS.delete = lambda self, rel: os._exit(3) if rel.startswith("_parts/") else real(self, rel)
        w.write("cam0", [WindowRow(k, 5.0 * k, 5.0 * k + 1.0, True, False, False, k == 0, [], np.zeros(2, np.float32), "tiny")])
    """
)


@pytest.mark.parametrize("point, parts_after_open", [("before the merge record", 8),
                                                     ("before the merged parts are deleted", 1)])
def test_a_crash_while_merging_hidden_parts(tmp_path, point, parts_after_open):
    proc = subprocess.run([sys.executable, "-c", MERGE_CRASH.format(root=str(tmp_path), point=point)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 3, proc.stderr
    assert len(list((tmp_path / "_parts").rglob("*.parquet"))) == 9  # the 8 parts and the merged one
    assert reader_ids(tmp_path) == [("cam0", k) for k in range(8)]
    with writer(tmp_path) as w:
        assert len(list((tmp_path / "_parts").rglob("*.parquet"))) == parts_after_open
        assert reader_ids(tmp_path) == [("cam0", k) for k in range(8)] and w.resume_from("cam0") == 8
    assert glob_ids(tmp_path) == [("cam0", k) for k in range(8)]


def test_retention_deletes_old_periods_and_a_resume_does_not_redo_them(tmp_path):
    keep = 150 / 86400  # 150 s of media time, in days
    with writer(tmp_path, publish_every_s=60, retain_days=keep) as w:
        for start in range(0, 60, 12):  # 5 periods, 0 .. 295 s
            w.write("cam0", [wrow(k) for k in range(start, start + 12)])
    # latest window at 295 s: periods ending at or before 145 s (0 and 1) are gone
    assert glob_ids(tmp_path) == [("cam0", k) for k in range(24, 60)]
    assert reader_ids(tmp_path) == glob_ids(tmp_path)
    with writer(tmp_path, publish_every_s=60, retain_days=keep) as w:
        assert sorted(k for k, p in w.state("cam0").periods.items() if p.retired) == [0, 1]
        assert w.resume_from("cam0") == 60 and w.is_committed("cam0", 3)
        assert w.write("cam0", [wrow(k) for k in range(0, 12)]) == []  # retired windows stay committed
    assert glob_ids(tmp_path) == [("cam0", k) for k in range(24, 60)]


def test_a_full_disk_leaves_nothing_half_written(tmp_path, monkeypatch):
    real = OutputFS._write

    def full_at(prefix: str):
        def write(self, rel, fill):
            if rel.startswith(prefix):
                with self.fs.open_output_stream(self.path(rel)) as fh:
                    fh.write(b"PAR1 half")  # some bytes reach the disk, then it is full
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, rel, fill)
        return write

    with writer(tmp_path, publish_every_s=60) as w:
        w.write("cam0", [wrow(k) for k in range(10)])
        monkeypatch.setattr(OutputFS, "_write", full_at("_parts/flow/"))
        with pytest.raises(OutputError, match="no space left") as err:
            w.write("cam0", [wrow(10)], flow=[frow(10)])
        assert "\n" not in str(err.value)
        assert w.committed("cam0") == set(range(10)) and not list(tmp_path.rglob("*.tmp"))
        assert len(list((tmp_path / "_parts").rglob("*.parquet"))) == 1  # the window part of the failed commit is gone
        monkeypatch.setattr(OutputFS, "_write", full_at("windows/"))  # the disk fills while publishing
        with pytest.raises(OutputError, match="no space left"):
            w.write("cam0", [wrow(k) for k in range(10, 13)])  # commits, then fails to publish period 0
        assert w.committed("cam0") == set(range(13)) and not list(tmp_path.rglob("*.tmp"))
        assert glob_ids(tmp_path) == [] and reader_ids(tmp_path) == [("cam0", k) for k in range(13)]
        monkeypatch.undo()
    assert glob_ids(tmp_path) == [("cam0", k) for k in range(13)]


def test_24_hours_of_media_time_make_at_most_50_files_per_table_per_stream(tmp_path):
    """The rule: a stream has one file per table per period of ``publish_every_s`` of media time
    it covers (24 for a day at the default 3600 s), plus one per resume that continued a period
    a drain had published. Driven as the sink drives it on an unpaced replay: commits of 256
    windows (hop 5 s, so 17,280 windows make 24 hours)."""
    n = int(24 * 3600 / HOP)
    with writer(tmp_path) as w:
        for start in range(0, n, 256):
            ids = range(start, min(start + 256, n))
            w.write("cam0", [wrow(k) for k in ids], flow=[frow(k) for k in ids])
            if start % 2560 == 0:
                w.write_errors("cam0", [ErrorRow("SourceReconnected", "reconnected", window_id=start)])
    counts = {t: len(visible_files(tmp_path, t, "cam0")) for t in ("windows", "flow", "errors")}
    assert counts == {"windows": 24, "flow": 24, "errors": 7}, counts
    assert not list((tmp_path / "_parts").rglob("*.parquet"))
    assert len(list((tmp_path / "_manifest" / "stream_id=cam0").iterdir())) == 1
    assert duckdb.sql(f"select count(*), count(distinct window_id) from read_parquet('{tmp_path}/windows/**/*.parquet')"
                      ).fetchall() == [(n, n)]


def test_compact_publishes_a_folder_no_run_owns(tmp_path, capsys):
    w = writer(tmp_path, publish_every_s=60)
    w.write("cam0", [wrow(k) for k in range(30)])
    w.write("cam1", [wrow(k) for k in range(5)])
    assert run_pipeline.main(["compact", "--output", str(tmp_path)]) == 1  # a live writer owns it
    assert "another writer" in capsys.readouterr().err
    w.close(publish=False)  # a run that died without draining
    assert glob_ids(tmp_path) == [("cam0", k) for k in range(24)]
    assert run_pipeline.main(["compact", "--output", str(tmp_path), "--retain-days", str(60 / 86400)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["streams"]["cam0"] == {"published": [2], "retired": [0], "files": {"windows": 2}}
    assert out["streams"]["cam1"] == {"published": [0], "retired": [], "files": {"windows": 1}}
    assert glob_ids(tmp_path) == [("cam0", k) for k in range(12, 30)] + [("cam1", k) for k in range(5)]
    assert run_pipeline.main(["compact", "--output", str(tmp_path / "typo")]) == 1
    assert "no perceiver-stream outputs" in capsys.readouterr().err and not (tmp_path / "typo").exists()


def test_a_model_change_within_a_period_publishes_one_file_per_schema(tmp_path):
    with writer(tmp_path) as w:
        w.write("cam0", [wrow(k) for k in range(3)])
        w.model_name = "bigger"
        wide = [WindowRow(k, HOP * k, HOP * k + 1.0, True, False, False, False, [], np.zeros(5, np.float32), "bigger")
                for k in range(3, 5)]
        w.write("cam0", wide)
    assert visible_files(tmp_path, "windows", "cam0") == ["part-000000-000-00.parquet", "part-000000-000-01.parquet"]
    models = duckdb.sql(f"select model, count(*) from read_parquet('{tmp_path}/windows/**/*.parquet', "
                        "union_by_name = true) group by 1 order by 1").fetchall()
    assert models == [("bigger", 2), ("tiny", 3)]
