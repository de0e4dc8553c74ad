"""End-to-end runs on Ray (2 CPUs): synthetic and PyAV-clip streams through a tiny model into
Parquet, a bad stream among good ones, SIGTERM then resume, and a model actor killed mid-run.
Outputs are read back with pyarrow (hive partitioning), DuckDB and Polars."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow.dataset as ds
import pytest
import ray
import yaml

from paths import REPO
import run_pipeline
from actors.bench import bench
from actors.runner import run
from actors.streams import RunningPipeline
from clips import write_clip
from perceiver_stream.checkpoint import read_config
from pipeline.config import config_hash, parse_config, student_checkpoint_path
from pipeline.errors import ConfigError
from pipeline.parquet import read_file_metadata
from pipeline.read import read_windows
from pipeline.sources.synthetic import CLASSES

SECONDS = 4.0  # a synthetic stream of 4 s gives 7 windows (1 s, hop 0.5)
WINDOWS = 7


def config_data(checkpoint: Path, streams: list[dict], **runtime) -> dict:
    return {
        "streams": streams,
        **read_config(checkpoint)[1]["data"],  # windows, frames and audio as the checkpoint reads them
        "model": {"checkpoint": str(checkpoint), "device": "cpu", "batch_size": 4, "max_wait_ms": 20},
        "runtime": {"max_in_flight_per_stream": 3, "max_in_flight": 8, **runtime},
    }


def synthetic(sid: str, seed: int, seconds: float = SECONDS) -> dict:
    return {"id": sid, "synthetic": {"seed": seed, "seconds": seconds}}


def read_table(out: Path, table: str):
    return ds.dataset(out / table, format="parquet", partitioning="hive").to_table()


def ids_by_stream(out: Path, table: str = "windows") -> dict[str, list[int]]:
    rows = duckdb.sql(
        f"select stream_id, window_id from read_parquet('{out}/{table}/*/*.parquet', hive_partitioning=true)"
    ).fetchall()
    got: dict[str, list[int]] = {}
    for sid, wid in rows:
        got.setdefault(sid, []).append(wid)
    return {sid: sorted(v) for sid, v in got.items()}


def test_synthetic_run_writes_every_table_once(ray_session, tiny_checkpoint, tmp_path):
    # The run-wide bound (4) is below the sum of the per-stream ones (2 x 3), so both bind.
    cfg = parse_config(config_data(tiny_checkpoint, [synthetic("a", 1), synthetic("b", 2)], max_in_flight=4))
    out = tmp_path / "out"
    seen = {"total": 0, "stream": 0, "sink": 0}

    def watch(p: RunningPipeline) -> None:
        seen["total"] = max(seen["total"], p.in_flight)
        seen["stream"] = max([seen["stream"], *(s.in_flight for s in p.streams.values())])
        seen["sink"] = max(seen["sink"], p.at_sink)

    summary = run(cfg, out, on_progress=watch)
    assert summary.exit_code == 0 and summary.failed == [] and summary.windows == 2 * WINDOWS
    assert 1 <= seen["total"] <= 4 and 1 <= seen["stream"] <= 3 and seen["sink"] <= 4
    assert ids_by_stream(out) == {"a": list(range(WINDOWS)), "b": list(range(WINDOWS))}
    assert ids_by_stream(out, "flow") == {"a": list(range(WINDOWS)), "b": list(range(WINDOWS))}

    windows = read_table(out, "windows")
    width = read_config(tiny_checkpoint)[0].encoder.latent_channels
    assert windows.schema.field("embedding").type.list_size == width
    df = pl.from_arrow(windows).sort(["stream_id", "window_id"])
    assert df.filter(pl.col("state_reset"))["window_id"].to_list() == [0, 0]  # first window only
    assert df["has_video"].all() and df["has_audio"].all() and df["has_points"].all()
    assert (df["t_end"] - df["t_start"]).to_list() == pytest.approx([1.0] * len(df))
    assert set(df["model"].to_list()) == {"tiny"}
    assert df["t_wall"].is_null().all()  # a synthetic rig has no wall clock
    labels = df["labels"].to_list()[0]
    assert len(labels) == 5 and {x["label"] for x in labels} <= set(CLASSES)
    assert [x["score"] for x in labels] == sorted((x["score"] for x in labels), reverse=True)

    flow = pl.from_arrow(read_table(out, "flow"))
    assert set(flow["height"].to_list()) == {16} and set(flow["width"].to_list()) == {16}
    assert all(len(f) == 16 * 16 * 2 and np.isfinite(f).all() for f in flow["flow"].to_list())
    assert (flow["t"] < 0.5 * flow["window_id"] + 1.0).all()

    part = next((out / "windows" / "stream_id=a").glob("part-*.parquet"))
    meta = read_file_metadata(part)
    assert meta["model"] == "tiny" and meta["config_hash"] == config_hash(cfg) and meta["schema_version"]


def test_run_over_pyav_clips(ray_session, tiny_checkpoint, tmp_path):
    streams = []
    for i, seconds in enumerate((2.0, 3.0)):
        # clip0 knows when it was recorded: its windows' t_wall is that plus their media time.
        meta = {"creation_time": "2026-03-04T14:05:00Z"} if i == 0 else None
        clip = write_clip(tmp_path / f"clip{i}.mp4", seconds=seconds, size=(32, 32), fps=10, metadata=meta)
        streams.append({"id": f"cam{i}", "video": str(clip), "audio": "same"})
    cfg = parse_config(config_data(tiny_checkpoint, streams))
    expected = {
        s["id"]: [w.window_id for w in read_windows(s, 1.0, 0.5, video={"size": [16, 16]})] for s in streams
    }
    assert all(len(v) >= 2 for v in expected.values())
    out = tmp_path / "out"
    summary = run(cfg, out)
    assert summary.exit_code == 0
    assert ids_by_stream(out) == expected
    df = pl.from_arrow(read_table(out, "windows"))
    assert df["has_video"].all() and df["has_audio"].all() and not df["has_points"].any()
    cam0 = df.filter(pl.col("stream_id") == "cam0")
    created = datetime(2026, 3, 4, 14, 5, tzinfo=timezone.utc).timestamp()
    lag = [t.timestamp() - created - e for t, e in zip(cam0["t_wall"].to_list(), cam0["t_end"].to_list())]
    assert all(0 <= x <= 0.1 + 1e-6 for x in lag)  # within the last frame (10 fps) past t_end
    assert df.filter(pl.col("stream_id") == "cam1")["t_wall"].is_null().all()


def test_one_bad_stream_costs_one_error_row_and_exit_3(ray_session, tiny_checkpoint, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video file" * 100)
    streams = [synthetic("good0", 1), {"id": "bad", "video": str(bad)}, synthetic("good1", 2)]
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(config_data(tiny_checkpoint, streams)))
    out = tmp_path / "out"
    code = run_pipeline.main(["--config", str(cfg_file), "--output", str(out), "--no-progress"])
    assert code == 3
    assert ids_by_stream(out) == {"good0": list(range(WINDOWS)), "good1": list(range(WINDOWS))}
    errors = pl.from_arrow(read_table(out, "errors"))
    assert errors["stream_id"].to_list() == ["bad"]
    assert errors["kind"][0] in {"SourceOpenError", "DecodeError"} and "bad" in errors["message"][0]
    assert errors["window_id"][0] is None

    only_bad = tmp_path / "bad.yaml"
    only_bad.write_text(yaml.safe_dump(config_data(tiny_checkpoint, [{"id": "bad", "video": str(bad)}])))
    assert run_pipeline.main(["--config", str(only_bad), "--output", str(tmp_path / "o2"), "--no-progress"]) == 1


def test_model_actor_killed_mid_run_loses_and_repeats_nothing(ray_session, tiny_checkpoint, tmp_path):
    cfg = parse_config(config_data(tiny_checkpoint, [synthetic("a", 1, 8.0), synthetic("b", 2, 8.0)]))
    killed = []

    def kill_once(p: RunningPipeline) -> None:
        if not killed and p.windows >= 4:
            killed.append(p.windows)
            ray.kill(p.model, no_restart=False)

    out = tmp_path / "out"
    summary = run(cfg, out, on_progress=kill_once)
    assert killed and summary.restarts == 1 and summary.exit_code == 0
    n = 15  # 8 s at 1 s / 0.5 s
    assert ids_by_stream(out) == {"a": list(range(n)), "b": list(range(n))}
    df = pl.from_arrow(read_table(out, "windows")).sort(["stream_id", "window_id"])
    resets = df.filter(pl.col("state_reset")).group_by("stream_id").agg(pl.col("window_id").min(), pl.len())
    # A stream that still had windows to run when the kill landed (ray.kill is asynchronous, so
    # a stream may have finished just before) starts a new state chain on the new incarnation.
    assert set(resets["window_id"].to_list()) == {0}
    assert set(resets["len"].to_list()) <= {1, 2} and 2 in resets["len"].to_list()


def test_sigterm_drains_then_resume_completes_without_gaps_or_repeats(ray_session, tiny_checkpoint, tmp_path):
    seconds, n = 30.0, 59
    cfg_file = tmp_path / "cfg.yaml"
    streams = [synthetic("a", 1, seconds), synthetic("b", 2, seconds)]
    cfg_file.write_text(yaml.safe_dump(config_data(tiny_checkpoint, streams)))
    out = tmp_path / "out"
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, str(REPO / "run_pipeline.py"), "--config", str(cfg_file), "--output", str(out)]
    cmd += ["--address", address, "--no-progress"]
    proc = subprocess.Popen(cmd + ["--realtime"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    manifest = out / "_manifest"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if any(manifest.glob("stream_id=*/[rs]*.json")):  # a first commit
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, log
    assert "draining" in log
    first = ids_by_stream(out)
    assert first and all(ids == list(range(len(ids))) for ids in first.values())
    assert all(len(ids) < n for ids in first.values()), "the run ended before the signal"

    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert ids_by_stream(out) == {"a": list(range(n)), "b": list(range(n))}
    df = pl.from_arrow(read_table(out, "windows"))
    for sid, ids in first.items():
        resumed = df.filter((pl.col("stream_id") == sid) & (pl.col("window_id") == len(ids)))
        assert resumed["state_reset"].to_list() == [True]


def test_distilling_run_writes_student_rows_and_a_student_the_pipeline_can_run_on(
    ray_session, tiny_checkpoint, tmp_path
):

    data = config_data(tiny_checkpoint, [synthetic("a", 1), synthetic("b", 2)])
    data["distill"] = {"enabled": True, "checkpoint_every": 2, "student": {"encoder": {"num_latents": 4}}}
    out = tmp_path / "out"
    summary = run(parse_config(data), out)
    assert summary.exit_code == 0 and summary.windows == 2 * WINDOWS
    d = summary.distill
    assert d is not None and "error" not in d and d["steps"] >= 1
    assert d["windows"] + d["dropped_windows"] == 2 * WINDOWS  # every window distilled or counted as dropped

    student = pl.from_arrow(read_table(out, "student"))
    keys = list(zip(student["stream_id"].to_list(), student["window_id"].to_list()))
    assert len(keys) == len(set(keys)) == d["windows"]  # unique, one per distilled window
    committed = {(sid, w) for sid, ids in ids_by_stream(out).items() for w in ids}
    assert set(keys) <= committed
    width = read_config(tiny_checkpoint)[0].encoder.latent_channels  # the student keeps the teacher's
    assert all(len(e) == width and np.isfinite(e).all() for e in student["embedding"].to_list())
    assert all(-1.0 <= c <= 1.0 + 1e-6 for c in student["cosine_to_teacher"].to_list())

    ckpt = student_checkpoint_path(out)
    assert ckpt.parent.name == "_checkpoints" and (ckpt / "config.json").is_file()
    assert ids_by_stream(out) == {"a": list(range(WINDOWS)), "b": list(range(WINDOWS))}  # readers skip it

    data["distill"]["enabled"] = False
    data["model"]["student"] = str(ckpt)
    on_student = tmp_path / "on_student"
    assert run(parse_config(data), on_student).exit_code == 0
    assert ids_by_stream(on_student) == {"a": list(range(WINDOWS)), "b": list(range(WINDOWS))}
    assert set(pl.from_arrow(read_table(on_student, "windows"))["model"].to_list()) == {"student"}

    data["distill"]["enabled"] = True  # a student distilled from a student is refused
    with pytest.raises(ConfigError, match="model.student"):
        run(parse_config(data), tmp_path / "refused")


def test_bench_reports_model_pipeline_and_student_rates_from_repeated_runs(ray_session, tiny_checkpoint, tmp_path):
    cfg = parse_config(config_data(tiny_checkpoint, [synthetic("b0", 61), synthetic("b1", 62)]),
                       base_dir=tmp_path)
    out = bench(cfg, output=tmp_path / "scratch", repeat=2)
    runs = out["runs"]
    assert len(runs["model_windows_per_s"]) == len(runs["pipeline_windows_per_s"]) == 2
    assert len(runs["student_windows_per_s"]) == 2
    # medians of two runs are the lower ones; the ratio and speedup are taken from them
    assert out["model_windows_per_s"] == min(runs["model_windows_per_s"]) > 0
    assert out["pipeline_windows_per_s"] == min(runs["pipeline_windows_per_s"]) > 0
    assert out["ratio"] == pytest.approx(out["pipeline_windows_per_s"] / out["model_windows_per_s"], abs=2e-3)
    assert out["student_speedup"] == pytest.approx(out["student_windows_per_s"] / out["model_windows_per_s"], abs=1e-2)
    # every pre-built window is run by the model, and every window is written by each pipeline run
    assert out["windows"] == {"model": 2 * (WINDOWS - 1), "pipeline": 2 * WINDOWS}
    assert out["student"]["weights"].startswith("random")
    assert {"model", "sources", "sink", "driver"} <= set(out["cpu_ms_per_window"]["pipeline"])
    for i in range(2):  # each pipeline run wrote into a folder of its own
        assert ids_by_stream(tmp_path / "scratch" / f"run{i}") == {"b0": list(range(WINDOWS)), "b1": list(range(WINDOWS))}
    with pytest.raises(ConfigError, match="repeat"):
        bench(cfg, repeat=0)
