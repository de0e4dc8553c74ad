"""The status line (every N seconds: rate, lag, restarts, per-stream state) and what a run logs at
start (the dashboard and metrics endpoints, build info); the logging options of the CLI."""

from __future__ import annotations

import logging

import pytest

import run_pipeline
from actors.status import StatusLine, announce
from actors.streams import RunningPipeline, StreamStatus


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_status_line_every_interval_with_rate_lag_and_states(caplog):
    caplog.set_level(logging.INFO, logger="perceiver_stream")
    slow, fast, gone = StreamStatus("slow"), StreamStatus("fast", start_window=10), StreamStatus("gone")
    gone.source_ended()  # nothing in flight: done at once, no lag
    p = RunningPipeline(None, None, {}, {"slow": slow, "fast": fast, "gone": gone})
    p.restarts = 2
    clock = Clock()
    status = StatusLine(hop=0.5, every_s=30.0, clock=clock)
    status.update(p)  # t = 0: the reference point
    clock.t = 1.0
    slow.decoded(0, 0)
    fast.decoded(0, 10)
    status.update(p)  # both first seen decoding at t = 1
    clock.t = 29.0
    status.update(p)
    assert caplog.records == []  # not yet 30 s

    clock.t = 31.0
    for w in range(1, 21):  # 20 more windows (10 media seconds) in 30 s: 20 s behind
        slow.decoded(w, w)
    for w in range(11, 111):  # 100 more windows (50 media seconds) in 30 s: ahead of real time
        fast.decoded(w - 10, w)
    slow.windows, fast.windows = 21, 62
    status.update(p)
    (rec,) = caplog.records
    s = rec.status
    assert s["windows"] == 83 and s["windows_per_s"] == pytest.approx(83 / 31, abs=0.01) and s["restarts"] == 2
    assert s["streams"]["slow"] == {"state": "running", "windows": 21, "lag_s": 20.0}
    assert s["streams"]["fast"] == {"state": "running", "windows": 62, "lag_s": 0.0}
    assert s["streams"]["gone"] == {"state": "done", "windows": 0}
    assert s["lag_s"] == 20.0
    assert rec.getMessage().startswith("status: 83 windows, 2.7/s, lag 20.0 s, restarts 2")
    assert rec.getMessage().endswith("; slow running 21 lag 20.0 s, fast running 62 lag 0.0 s, gone done 0")

    clock.t = 45.0
    status.update(p)
    assert len(caplog.records) == 1  # the next one is due at 61 s


def test_announce_logs_the_endpoints_and_sets_build_info(ray_session, caplog):
    caplog.set_level(logging.INFO, logger="perceiver_stream")
    got = announce("127.0.0.1:8265", "1.2.3")
    node = next(n for n in ray_session.nodes() if n["NodeID"] == ray_session.get_runtime_context().get_node_id())
    assert got == {"dashboard": "http://127.0.0.1:8265",
                   "metrics": f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"}
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"Ray dashboard: {got['dashboard']}", f"Prometheus metrics (ray_pstream_*): {got['metrics']}"]
    assert announce("", "1.2.3")["dashboard"] is None  # --no-dashboard


def test_logging_and_status_options():
    args = run_pipeline.build_parser().parse_args(["run", "--log-level", "debug", "--log-format", "json",
                                                   "--status-every", "5"])
    assert (args.log_level, args.log_format, args.status_every) == ("debug", "json", 5.0)
    args = run_pipeline.build_parser().parse_args(["eval", "--seed", "500"])
    assert (args.log_level, args.log_format) == ("info", "text")
    assert run_pipeline.build_parser().parse_args(["run"]).status_every == 30.0
    assert run_pipeline.main(["run", "--log-level", "loud"]) == 2
