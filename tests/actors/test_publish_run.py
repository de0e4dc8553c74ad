"""A run publishes as it goes: a stream that ends is published while the others still run, and
closed periods of a running stream are published before the run ends (glob readers see them)."""

from __future__ import annotations

from pathlib import Path

import duckdb

from actors.runner import run
from actors.streams import RunningPipeline
from pipeline.config import parse_config
from pipeline.reader import open_dataset
from test_e2e import config_data, synthetic


def glob_ids(out: Path, sid: str) -> list[int]:
    files = list((out / "windows" / f"stream_id={sid}").glob("*.parquet"))
    if not files:
        return []
    return sorted(r[0] for r in duckdb.sql(f"select window_id from read_parquet({[str(f) for f in files]})").fetchall())


def test_an_ended_stream_and_closed_periods_are_published_during_the_run(ray_session, tiny_checkpoint, tmp_path):
    # "short" ends after 3 windows; "long" runs paced for 8 s, publishing every 2 s of media time
    data = config_data(tiny_checkpoint, [synthetic("short", 1, 2.0), synthetic("long", 2, 8.0)], realtime=True)
    cfg = parse_config({**data, "output": {"dir": str(tmp_path), "publish_every_s": 2.0}})
    out = tmp_path / "out"
    seen: dict[str, list[int]] = {}

    def watch(p: RunningPipeline) -> None:
        if not p.streams["long"].finished:
            seen["short"] = glob_ids(out, "short")
            seen["long"] = glob_ids(out, "long")

    summary = run(cfg, out, on_progress=watch)
    assert summary.exit_code == 0
    assert seen["short"] == [0, 1, 2]  # published once it ended, while "long" still ran
    assert seen["long"] and seen["long"] == list(range(len(seen["long"]))) and len(seen["long"]) < 15
    assert glob_ids(out, "long") == list(range(15))
    windows = open_dataset(out, "windows").to_table()
    assert windows.num_rows == 18 and not list((out / "_parts").rglob("*.parquet"))
