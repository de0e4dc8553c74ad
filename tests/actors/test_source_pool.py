"""Source pool actors: rendezvous assignment, the restart budget, a pool's per-stream call order,
and runs on Ray: a pool killed mid-run resumes its streams, a bad stream fails alone, and 64
short streams each commit every window exactly once."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow.dataset as ds
import pytest
import ray
from ray import cloudpickle

from actors.assign import assign, rendezvous, resolve_node
from actors.restarts import RestartBudget
from actors.runner import run
from actors.source_pool import SourcePoolActor
from actors.streams import RunningPipeline
from pipeline.config import parse_config
from pipeline.errors import ConfigError
from pipeline.read import open_stream as read_stream
from pipeline.window import Window
from tiny import HW, RATE


def make_cfg(checkpoint: Path, streams: list[dict], **runtime):
    return parse_config({
        "streams": streams,
        "window": {"seconds": 1.0, "hop": 0.5},
        "video": {"size": [HW, HW]},
        "audio": {"rate": RATE},
        "model": {"checkpoint": str(checkpoint), "device": "cpu", "batch_size": 8, "max_wait_ms": 20},
        "runtime": {"max_in_flight_per_stream": 3, "max_in_flight": 16, **runtime},
    })


def synthetic(sid: str, seed: int, seconds: float) -> dict:
    return {"id": sid, "synthetic": {"seed": seed, "seconds": seconds}}


def rows(out: Path, table: str) -> pl.DataFrame:
    return pl.from_arrow(ds.dataset(out / table, format="parquet", partitioning="hive").to_table())


def ids_by_stream(out: Path) -> dict[str, list[int]]:
    got: dict[str, list[int]] = {}
    for sid, wid in duckdb.sql(
        f"select stream_id, window_id from read_parquet('{out}/windows/*/*.parquet', hive_partitioning=true)"
    ).fetchall():
        got.setdefault(sid, []).append(wid)
    return {sid: sorted(v) for sid, v in got.items()}


# -- assignment and budget ------------------------------------------------------------------------
def test_rendezvous_assignment_is_stable_and_moves_only_the_streams_of_a_pool_that_leaves():
    streams = {f"cam{i}": None for i in range(400)}
    pools = {str(i): "node-a" for i in range(4)}
    first = assign(streams, pools)
    assert first == assign(dict(reversed(streams.items())), pools)  # order does not matter
    counts = [list(first.values()).count(p) for p in pools]
    assert min(counts) > 60  # about a quarter each
    without = assign(streams, {p: n for p, n in pools.items() if p != "2"})
    assert all(without[s] == first[s] for s in streams if first[s] != "2")
    assert all(without[s] != "2" for s in streams)
    with_more = assign(streams, {**pools, "4": "node-a"})
    assert all(with_more[s] in (first[s], "4") for s in streams)
    assert rendezvous("cam7", ["1"]) == "1"


def test_a_pinned_stream_goes_to_a_pool_on_its_node():
    pools = {"0": "node-a", "1": "node-b", "2": "node-b"}
    got = assign({f"s{i}": "node-b" for i in range(20)} | {"x": "node-a"}, pools)
    assert {got[f"s{i}"] for i in range(20)} <= {"1", "2"} and got["x"] == "0"
    with pytest.raises(ConfigError, match="pinned to node 'node-c'"):
        assign({"y": "node-c"}, pools)


NODES = [
    {"NodeID": "aaa111", "NodeManagerAddress": "10.0.0.1", "Alive": True, "Resources": {"CPU": 2.0, "usb_cam": 1.0}},
    {"NodeID": "bbb222", "NodeManagerAddress": "10.0.0.2", "Alive": True, "Resources": {"CPU": 2.0, "lidar": 1.0}},
    {"NodeID": "ccc333", "NodeManagerAddress": "10.0.0.2", "Alive": True, "Resources": {"CPU": 2.0, "lidar": 1.0}},
    {"NodeID": "ddd444", "NodeManagerAddress": "10.0.0.4", "Alive": False, "Resources": {"CPU": 2.0}},
]


def test_a_streams_node_is_a_node_id_an_ip_or_a_resource_of_one_live_node():
    assert resolve_node("cam", "bbb222", NODES) == "bbb222"
    assert resolve_node("cam", "10.0.0.1", NODES) == "aaa111"
    assert resolve_node("cam", "usb_cam", NODES) == "aaa111"
    with pytest.raises(ConfigError, match="'cam': node '10.0.0.2' is the address of 2 nodes; pin it by node id"):
        resolve_node("cam", "10.0.0.2", NODES)
    with pytest.raises(ConfigError, match="'lidar' is a resource of 2 nodes"):
        resolve_node("cam", "lidar", NODES)
    with pytest.raises(ConfigError, match=r"'cam': node '10.0.0.4' is no live node's id, IP or resource \(live"):
        resolve_node("cam", "10.0.0.4", NODES)  # that node is dead
    with pytest.raises(ConfigError, match="streams.0.node: String should have at least 1 character"):
        parse_config({"streams": [{"id": "s", "synthetic": {"seed": 0}, "node": ""}]})


def test_restart_budget_allows_so_many_per_actor_within_a_rolling_hour():
    now = [0.0]
    budget = RestartBudget(2, clock=lambda: now[0])
    assert budget.spend("model actor") and budget.spend("model actor")
    assert budget.spend("source pool actor 0")  # each actor has its own count
    assert not budget.spend("model actor")
    now[0] = 3600.0
    assert budget.spend("model actor")
    assert not RestartBudget(0).spend("model actor")


def test_the_runtime_config_validates_source_actors_and_restarts():
    streams = [synthetic("a", 1, 2)]
    assert parse_config({"streams": streams}).runtime.source_actors == "auto"
    assert parse_config({"streams": streams, "runtime": {"source_actors": 3}}).runtime.source_actors == 3
    for bad in ({"source_actors": 0}, {"source_actors": "many"}, {"max_restarts_per_hour": -1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            parse_config({"streams": streams, "runtime": bad})


# -- the pool actor in-process --------------------------------------------------------------------
def fake_open(n: int, fail_at: int | None = None):
    def open_stream(stream, cfg, *, start_window=0, **kw):
        for k in range(start_window, n):
            if k == fail_at:
                raise OSError(f"bad input at window {k}")
            yield Window(stream.id, k, 0.5 * k, 0.5 * k + 1.0, video=np.zeros((2, 4, 4, 3), np.uint8),
                         video_t=np.array([0.5 * k, 0.5 * k + 0.1]))

    return open_stream


def test_a_pool_runs_each_streams_calls_in_seq_order_and_keeps_a_failure_to_its_stream():
    cfg = parse_config({"streams": [synthetic("a", 1, 3), synthetic("b", 2, 3)], "runtime": {"helper_nice": 0}})
    pool = SourcePoolActor(cfg, open_stream=fake_open(4, fail_at=None))  # nice 0: this is the test process
    bad = SourcePoolActor(cfg, open_stream=fake_open(4, fail_at=2))
    pool.add([(cfg.streams[0], 1, 0, None)])
    bad.add([(cfg.streams[1], 0, 5, None)])
    got: dict[int, int | None] = {}

    def call(seq: int) -> None:
        got[seq] = pool.next("a", seq)[0].window_id

    threads = [threading.Thread(target=call, args=(seq,)) for seq in (2, 0, 1)]  # arrive out of order
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert got == {0: 1, 1: 2, 2: 3}
    events = [bad.next("b", seq)[0] for seq in (5, 6, 7)]
    assert [e.window_id for e in events[:2]] == [0, 1]
    assert events[2].done and events[2].failure.kind == "OSError" and events[2].failure.window_id == 2
    assert pool.next("a", 3)[0].done  # the other pool's stream is unaffected
    with pytest.raises(KeyError, match="does not host"):
        pool.next("b", 0)


def test_stop_ends_a_stream_whose_camera_is_down():
    # A camera that never comes up, retried for ever: the drain's stop ends its pending call.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/cam.ts"
    cfg = parse_config({"streams": [{"id": "cam", "video": url}], "runtime": {"helper_nice": 0},
                        "sources": {"reconnect_tries": None, "reconnect_backoff_s": 0.05, "max_backoff_s": 0.2}})
    pool = SourcePoolActor(cfg)
    pool.add([(cfg.streams[0], 0, 0, None)])
    got = []
    caller = threading.Thread(target=lambda: got.append(pool.next("cam", 0)))
    caller.start()
    caller.join(timeout=1.0)
    assert caller.is_alive()  # still waiting for the camera
    pool.stop()
    caller.join(timeout=5)
    (event, window), = got
    assert window is None and event.done and event.failure is None
    assert [e.kind for e in event.errors] == ["SourceOpenError"]  # it was down from the start


# -- on Ray ---------------------------------------------------------------------------------------
def test_a_pool_actor_killed_mid_run_is_restarted_and_resumes_its_streams(ray_session, tiny_checkpoint, tmp_path):
    cfg = make_cfg(tiny_checkpoint, [synthetic(f"s{i}", i, 8.0) for i in range(4)], source_actors=2)
    killed: list[str] = []

    def kill_once(p: RunningPipeline) -> None:
        if not killed and p.windows >= 8:
            pool = sorted(p.pools)[0]
            pid = ray.get(p.pools[pool].info.remote())["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pool)

    out = tmp_path / "out"
    summary = run(cfg, out, on_progress=kill_once)
    assert killed and summary.exit_code == 0 and summary.restarts == 1
    n = 15  # 8 s at 1 s / 0.5 s
    assert ids_by_stream(out) == {f"s{i}": list(range(n)) for i in range(4)}  # each window exactly once
    errors = rows(out, "errors")
    assert set(errors["kind"].to_list()) == {"SourceRestarted"}
    died = f"source pool actor {killed[0]} died (its process ended; Ray reported no signal or exit code)"
    assert all(f"{died}; stream resumed at window" in m for m in errors["message"])
    # One row per stream of the killed pool that was still running; a stream resumed at window k
    # starts a new state chain there.
    windows = rows(out, "windows")
    for sid, wid in zip(errors["stream_id"], errors["window_id"]):
        reset = windows.filter((pl.col("stream_id") == sid) & (pl.col("window_id") == wid))["state_reset"]
        assert reset.to_list() == [True]
    assert 1 <= len(errors) <= 4 and errors["stream_id"].n_unique() == len(errors)


class _DieWhenShipped:
    """Rides on a window: pickling it (Ray storing the ``next`` call's reply, after the call has
    returned and the stream's next call has started) waits until that next window was decoded and
    its reply sent, then ends the pool's process: the driver gets window k+1 but never window k."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        decoded = Path(self.marker + ".next")
        while not decoded.exists():
            time.sleep(0.01)
        time.sleep(2.0)  # call k+1 has returned: its reply goes out meanwhile
        Path(self.marker).touch()  # once: the restarted pool decodes window k again and ships it
        os._exit(1)


def dying_open(marker: str, stream_id: str, at: int):
    """The pipeline's reader, but the pool dies shipping window ``at`` of ``stream_id`` (once)."""

    def open_stream(stream, cfg, **kw):
        for w in read_stream(stream, cfg, **kw):
            if stream.id == stream_id and not Path(marker).exists():
                if w.window_id == at:
                    w.truth = _DieWhenShipped(marker)
                elif w.window_id == at + 1:
                    Path(marker + ".next").touch()
            yield w

    return open_stream


def test_a_pool_that_dies_between_a_call_and_its_reply_resumes_at_the_lost_window(ray_session, tiny_checkpoint,
                                                                                 tmp_path):
    # Window 2's call returns, window 3 is decoded and delivered, then the pool dies before window
    # 2's reply leaves: a hole in seq. Windows after the hole are given up and decoded again.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the pool unpickles dying_open
    cfg = make_cfg(tiny_checkpoint, [synthetic("s0", 1, 4.0), synthetic("s1", 2, 4.0)], source_actors=1)
    started = time.monotonic()

    def watch(p: RunningPipeline) -> None:
        assert time.monotonic() - started < 60, "the run stalled"  # as it did before the fix

    out = tmp_path / "out"
    summary = run(cfg, out, on_progress=watch, open_stream=dying_open(str(tmp_path / "died"), "s0", 2))
    assert summary.exit_code == 0 and summary.restarts == 1
    assert ids_by_stream(out) == {sid: list(range(7)) for sid in ("s0", "s1")}  # each window exactly once
    errors = rows(out, "errors").filter(pl.col("stream_id") == "s0")
    assert errors["kind"].to_list() == ["SourceRestarted"] and errors["window_id"].to_list() == [2]
    assert "stream resumed at window 2" in errors["message"][0]
    windows = rows(out, "windows").filter(pl.col("stream_id") == "s0").sort("window_id")
    assert windows["state_reset"].to_list() == [True, False, True, False, False, False, False]


def test_one_streams_bad_input_fails_only_that_stream_in_a_shared_pool(ray_session, tiny_checkpoint, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video" * 200)
    streams = [synthetic("good0", 1, 3.0), {"id": "bad", "video": str(bad)}, synthetic("good1", 2, 3.0),
               {"id": "missing", "video": str(tmp_path / "nowhere.mp4")}]
    cfg = make_cfg(tiny_checkpoint, streams, source_actors=1)
    out = tmp_path / "out"
    summary = run(cfg, out)
    assert summary.exit_code == 3 and sorted(summary.failed) == ["bad", "missing"], summary.streams
    assert ids_by_stream(out) == {"good0": list(range(5)), "good1": list(range(5))}
    errors = rows(out, "errors").sort("stream_id")
    assert errors["stream_id"].to_list() == ["bad", "missing"]
    assert errors["kind"][1] == "SourceNotFound"


def test_64_short_streams_commit_every_window_exactly_once(ray_session, tiny_checkpoint, tmp_path):
    # The shipped bounds (16 a stream, 32 in all): replies of one pool may overtake each other, and a
    # window the model waits for must still reach it.
    cfg = make_cfg(tiny_checkpoint, [synthetic(f"cam{i:02d}", i, 2.0) for i in range(64)],
                   max_in_flight_per_stream=16, max_in_flight=32)
    out = tmp_path / "out"
    summary = run(cfg, out)
    assert summary.exit_code == 0 and summary.windows == 64 * 3
    assert ids_by_stream(out) == {f"cam{i:02d}": [0, 1, 2] for i in range(64)}


def test_streams_pinned_to_the_local_node_by_ip_and_by_id_run_there(ray_session, tiny_checkpoint, tmp_path):
    here = ray.get_runtime_context().get_node_id()
    ip = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == here)
    streams = [{**synthetic("by_ip", 1, 2.0), "node": ip}, {**synthetic("by_id", 2, 2.0), "node": here},
               synthetic("free", 3, 2.0)]
    seen: list[dict[str, str]] = []

    def where(p: RunningPipeline) -> None:
        seen.append({sid: ray.get(handle.info.remote())["node"] for sid, handle in p.sources.items()})

    out = tmp_path / "out"
    summary = run(make_cfg(tiny_checkpoint, streams, source_actors=2), out, on_start=where)
    assert summary.exit_code == 0
    assert seen == [{"by_ip": here, "by_id": here, "free": here}]
    assert ids_by_stream(out) == {"by_ip": [0, 1, 2], "by_id": [0, 1, 2], "free": [0, 1, 2]}
    with pytest.raises(ConfigError, match="stream 'lost': node 'no-such-node' is no live node's id, IP or resource"):
        run(make_cfg(tiny_checkpoint, [{**synthetic("lost", 1, 2.0), "node": "no-such-node"}]), tmp_path / "x")
