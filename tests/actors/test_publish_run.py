"""A run publishes as it goes: a stream that ends is published while the others still run, and
closed periods of a running stream are published before the run ends (glob readers see them);
the sink stops with one line on a full disk."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest

from actors.restarts import last_line
from actors.results import WindowResult
from actors.runner import run
from actors.sink import SinkActor
from actors.streams import RunningPipeline
from pipeline.config import parse_config
from pipeline.errors import OutputError
from pipeline.outputfs import OutputFS
from pipeline.parquet import WindowRow
from pipeline.reader import open_dataset
from test_e2e import config_data, synthetic


def glob_ids(out: Path, sid: str) -> list[int]:
    files = list((out / "windows" / f"stream_id={sid}").glob("*.parquet"))
    if not files:
        return []
    return sorted(r[0] for r in duckdb.sql(f"select window_id from read_parquet({[str(f) for f in files]})").fetchall())


def test_an_ended_stream_and_closed_periods_are_published_during_the_run(ray_session, tiny_checkpoint, tmp_path):
    # "short" ends after 3 windows; "long" runs paced for 12 s, publishing every 0.5 s of media time
    # (one window each), so the sink's commits while "long" runs publish all but its latest window
    data = config_data(tiny_checkpoint, [synthetic("short", 1, 2.0), synthetic("long", 2, 12.0)], realtime=True)
    cfg = parse_config({**data, "output": {"dir": str(tmp_path), "publish_every_s": 0.5}})
    out = tmp_path / "out"
    seen: dict[str, list[int]] = {}

    def watch(p: RunningPipeline) -> None:
        if not p.streams["long"].finished:
            seen["short"] = glob_ids(out, "short")
            seen["long"] = glob_ids(out, "long")

    summary = run(cfg, out, on_progress=watch)
    assert summary.exit_code == 0
    assert seen["short"] == [0, 1, 2]  # published once it ended, while "long" still ran
    assert seen["long"] and seen["long"] == list(range(len(seen["long"]))) and len(seen["long"]) < 23
    assert glob_ids(out, "long") == list(range(23))
    windows = open_dataset(out, "windows").to_table()
    assert windows.num_rows == 26 and not list((out / "_parts").rglob("*.parquet"))


def result(sid: str, k: int) -> WindowResult:
    row = WindowRow(k, 0.5 * k, 0.5 * k + 1.0, True, False, False, k == 0, [("a", 1.0)], np.zeros(2, np.float32), "tiny")
    return WindowResult(sid, row, flow=np.zeros((2, 2, 2), np.float32), flow_t=0.5 * k + 0.9)


def test_the_sink_publishes_an_ended_stream_and_stops_with_one_line_on_a_full_disk(ray_session, tmp_path, monkeypatch):
    sink = SinkActor(str(tmp_path), config_hash="h", model="tiny")
    assert sink.resume_points(["a", "b"]) == {"a": 0, "b": 0}
    sink.write(*(result("a", k) for k in range(3)), result("b", 0))
    sink.end_streams(["a"])  # commits everything buffered; "a" is published on the writer's thread
    deadline = time.monotonic() + 10
    while glob_ids(tmp_path, "a") != [0, 1, 2] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert glob_ids(tmp_path, "a") == [0, 1, 2] and glob_ids(tmp_path, "b") == []

    def full(self, rel, fill):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(OutputFS, "_write", full)
    sink.write(result("b", 1))
    with pytest.raises(OutputError) as err:
        sink.flush()
    assert "no space left" in last_line(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()
    assert sink.close().windows == {}  # b's window 1 went with the failed flush: a resume redoes it
    assert glob_ids(tmp_path, "b") == [0]
