"""The writer's maintenance thread: commits go on while a period is copied, marks coalesce, and an
error on the thread (a full disk) reaches the caller with every committed row kept once."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import pipeline.publish
from pipeline.errors import OutputError
from pipeline.maintenance import Maintenance
from pipeline.outputfs import OutputFS
from pipeline.parquet import OutputWriter
from pipeline.reader import open_dataset
from tests.pipeline.test_publish import frow, glob_ids, reader_ids, visible_files, wrow


def writer(root: Path) -> OutputWriter:
    return OutputWriter(root, model_name="tiny", config_hash="h", publish_every_s=60, background=True)


def test_marks_made_while_a_stream_is_worked_on_run_it_once_more():
    calls: list[str] = []
    started, release = threading.Event(), threading.Event()

    def work(sid: str) -> None:
        calls.append(sid)
        started.set()
        release.wait(10)

    m = Maintenance(work)
    m.due("a")
    assert started.wait(10)
    for sid in ("a", "b", "a", "a"):
        m.due(sid)
    release.set()
    m.drain()
    m.stop()
    assert calls == ["a", "a", "b"]


def test_the_first_error_of_the_work_is_raised_in_the_callers_thread():
    def work(sid: str) -> None:
        raise OutputError(f"{sid}: no space left on device")

    m = Maintenance(work)
    m.check()
    m.due("cam0")
    with pytest.raises(OutputError, match="cam0: no space left"):
        m.drain()
    with pytest.raises(OutputError, match="cam0"):
        m.check()
    m.stop()


@pytest.fixture
def held_copy(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Publication's table merge held until the test sets ``release``: ``(copying, release)``."""
    copying, release = threading.Event(), threading.Event()
    real = pipeline.publish._merge_table

    def slow_merge(*args, **kw):
        copying.set()
        assert release.wait(10), "the test never released the copy"
        return real(*args, **kw)

    monkeypatch.setattr(pipeline.publish, "_merge_table", slow_merge)
    return copying, release


def test_commits_go_on_while_a_closed_period_is_published(tmp_path, held_copy):
    copying, release = held_copy
    w = writer(tmp_path)
    w.write("cam0", [wrow(k) for k in range(12)])  # period 0: windows 0-11 (t_start < 60 s)
    w.write("cam0", [wrow(12)])  # period 0 is closed: its publication starts on the thread
    assert copying.wait(10)
    # While the copy waits, commits of this and another stream return, and are readable at once.
    w.write("cam0", [wrow(k) for k in range(13, 20)])
    w.write("cam1", [wrow(k) for k in range(5)])
    assert w.committed("cam0") == set(range(20)) and glob_ids(tmp_path) == []
    assert reader_ids(tmp_path) == [("cam0", k) for k in range(20)] + [("cam1", k) for k in range(5)]
    release.set()
    w.close()
    assert glob_ids(tmp_path) == [("cam0", k) for k in range(20)] + [("cam1", k) for k in range(5)]
    assert visible_files(tmp_path, "windows", "cam0") == ["part-000000-000-00.parquet", "part-000001-000-00.parquet"]
    assert not list((tmp_path / "_parts").rglob("*.parquet"))


def test_a_full_disk_while_publishing_in_the_background_reaches_the_next_write(tmp_path, monkeypatch):
    real = OutputFS._write

    def full(self, rel, fill):
        if rel.startswith("windows/"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, rel, fill)

    w = writer(tmp_path)
    w.write("cam0", [wrow(k) for k in range(12)])
    monkeypatch.setattr(OutputFS, "_write", full)
    w.write("cam0", [wrow(12), wrow(13)])  # committed; the publication of period 0 then fails
    deadline = time.monotonic() + 10
    with pytest.raises(OutputError, match="no space left"):
        while time.monotonic() < deadline:
            w.renew()
            time.sleep(0.05)
    with pytest.raises(OutputError, match="no space left"):
        w.write("cam0", [wrow(14)])
    assert w.committed("cam0") == set(range(14)) and not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()
    with pytest.raises(OutputError, match="no space left"):
        w.close()  # releases the folder, and still reports why it stopped publishing
    assert glob_ids(tmp_path) == [] and reader_ids(tmp_path) == [("cam0", k) for k in range(14)]
    with writer(tmp_path) as again:  # a restarted sink publishes what the failed one could not
        again.write("cam0", [wrow(14)])
    assert glob_ids(tmp_path) == [("cam0", k) for k in range(15)]
    t = open_dataset(tmp_path, "windows").to_table()
    assert t.num_rows == 15 and np.array_equal(np.sort(t.column("window_id").to_numpy()), np.arange(15))


def test_rows_of_a_period_committed_during_its_copy_are_published_as_its_next_piece(tmp_path, monkeypatch):
    copying, release = threading.Event(), threading.Event()
    real = pipeline.publish._merge_table

    def slow_merge(*args, **kw):
        copying.set()
        release.wait(10)
        return real(*args, **kw)

    monkeypatch.setattr(pipeline.publish, "_merge_table", slow_merge)
    w = writer(tmp_path)
    w.write("cam0", [wrow(k) for k in range(13)])  # period 0 closes: its windows are being copied
    assert copying.wait(10)
    w.write("cam0", flow=[frow(k) for k in range(4)])  # late flow rows of period 0's windows
    release.set()
    w.close()
    assert glob_ids(tmp_path) == [("cam0", k) for k in range(13)]
    assert glob_ids(tmp_path, "flow") == [("cam0", k) for k in range(4)]
    assert visible_files(tmp_path, "flow", "cam0") == ["part-000000-001-00.parquet"]
    assert visible_files(tmp_path, "windows", "cam0") == ["part-000000-000-00.parquet", "part-000001-000-00.parquet"]


def test_an_ended_stream_is_published_on_the_thread_while_other_streams_commit(tmp_path, held_copy):
    copying, release = held_copy
    w = writer(tmp_path)
    w.write("cam0", [wrow(k) for k in range(5)])  # all in the open period 0
    w.write("cam1", [wrow(0)])
    w.finish("cam0")  # returns while its open period is copied
    assert copying.wait(10)
    w.write("cam1", [wrow(k) for k in range(1, 4)])
    w.write("cam0", flow=[frow(k) for k in range(2)])  # late rows of the ended stream
    assert glob_ids(tmp_path) == [] and w.committed("cam1") == set(range(4))
    release.set()
    w._maintenance.drain()
    # The ended stream is published, its late rows as the next piece; cam1's open period is not.
    assert glob_ids(tmp_path) == [("cam0", k) for k in range(5)]
    assert glob_ids(tmp_path, "flow") == [("cam0", 0), ("cam0", 1)]
    assert visible_files(tmp_path, "flow", "cam0") == ["part-000000-001-00.parquet"]
    w.write("cam0", [wrow(5)])  # it runs again: its open period waits like any other
    w._maintenance.drain()
    assert glob_ids(tmp_path) == [("cam0", k) for k in range(5)]
    w.close()
    assert glob_ids(tmp_path) == [("cam0", k) for k in range(6)] + [("cam1", k) for k in range(4)]
