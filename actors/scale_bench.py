"""``run_pipeline.py bench --streams 4,16,64``: how the pipeline scales with the number of streams.

Each point runs the whole pipeline (unpaced, distillation off) on ``n`` synthetic streams cut so
that every point has the same total number of windows (``total_windows``, split evenly), so the
points differ only in how many streams carry them. Per point:

- ``windows_per_s``: windows written over the run's wall time, from the `actors.runner.run` call
  to its return (actor start-up included: that is what a user waits for);
- ``first_commit_s``: seconds from that call until the first window is committed (the first
  manifest line under the output folder);
- ``peak_rss_mb``: the peak, over the run, of the resident set summed over this process and every
  process under it (Ray's daemons and workers), sampled every `SAMPLE_S` by `RssSampler`.

Each point should run on a fresh Ray (the caller starts and stops it), so the workers of one
point neither serve nor weigh on the next.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import ray

from actors.runner import run
from actors.streams import RunningPipeline
from pipeline.config import Config, StreamConfig, SyntheticConfig
from pipeline.parquet import MANIFEST_DIR

SAMPLE_S = 0.2


class RssSampler:
    """Peak resident memory (bytes) of this process and all its descendants, sampled in a thread,
    and the first time (monotonic) a manifest line appears under ``output``."""

    def __init__(self, output: Path, interval_s: float = SAMPLE_S) -> None:
        self.output = output
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_processes = 0
        self.first_commit: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        me = psutil.Process()
        total, count = 0, 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
                count += 1
            except psutil.Error:  # it ended between the listing and the reading
                continue
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_processes = total, count
        if self.first_commit is None and self._committed():
            self.first_commit = time.monotonic()

    def _committed(self) -> bool:
        """Whether any stream's manifest has a record yet (`pipeline.manifest`: one object each)."""
        return any((self.output / MANIFEST_DIR).glob("stream_id=*/[rs]*.json"))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()


def stream_config(base: Config, n: int, windows_per_stream: int) -> Config:
    """``base`` with ``n`` synthetic streams (seeds 1000, 1001, ...) of ``windows_per_stream``
    windows each, unpaced, without distillation."""
    cfg = base.model_copy(deep=True)
    seconds = cfg.window.seconds + (windows_per_stream - 1) * cfg.window.hop
    cfg.streams = [
        StreamConfig(id=f"sim{i}", synthetic=SyntheticConfig(seed=1000 + i, seconds=seconds)) for i in range(n)
    ]
    cfg.distill.enabled = False
    cfg.runtime.realtime = False
    return cfg


def stream_point(base: Config, n: int, *, total_windows: int = 768, timeout_s: float = 300.0,
                 output: Path | None = None) -> dict[str, Any]:
    """One point of the table: the run of ``n`` streams sharing ``total_windows`` (on the Ray this
    process has joined). A run still going after ``timeout_s`` is drained and marked ``timed_out``."""
    if total_windows < n:
        raise ValueError(f"bench --streams: {total_windows} windows cannot be shared by {n} streams")
    cfg = stream_config(base, n, total_windows // n)
    timer: list[threading.Timer] = []
    timed_out = threading.Event()

    def expire(p: RunningPipeline) -> None:
        timed_out.set()
        p.stop()

    def started(p: RunningPipeline) -> None:
        timer.append(threading.Timer(timeout_s, expire, (p,)))
        timer[0].daemon = True
        timer[0].start()

    with tempfile.TemporaryDirectory(prefix="pstream-bench-streams-") as tmp:
        out = (output or Path(tmp)) / f"streams{n}"
        load = os.getloadavg()
        t0 = time.monotonic()
        with RssSampler(out) as rss:
            summary = run(cfg, out, on_start=started)
        wall = time.monotonic() - t0
    for t in timer:
        t.cancel()
    return {
        "streams": n,
        "windows": summary.windows,
        "expected_windows": n * (total_windows // n),
        "wall_s": round(wall, 2),
        "windows_per_s": round(summary.windows / wall, 2),
        "first_commit_s": None if rss.first_commit is None else round(rss.first_commit - t0, 2),
        "peak_rss_mb": round(rss.peak_bytes / 2**20, 1),
        "processes_at_peak": rss.peak_processes,
        "timed_out": timed_out.is_set(),
        "exit_code": summary.exit_code,
        "load_average_before": [round(x, 2) for x in load],
    }


def scaling_summary(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The table's comparisons between its smallest and largest point: the throughput ratio and
    the peak RSS each added stream costs."""
    lo, hi = min(points, key=lambda p: p["streams"]), max(points, key=lambda p: p["streams"])
    if hi["streams"] == lo["streams"]:
        return {}
    return {
        "windows_per_s_ratio": round(hi["windows_per_s"] / lo["windows_per_s"], 3) if lo["windows_per_s"] else None,
        "rss_mb_per_added_stream": round((hi["peak_rss_mb"] - lo["peak_rss_mb"]) / (hi["streams"] - lo["streams"]), 1),
        "between": [lo["streams"], hi["streams"]],
    }


def bench_streams(base: Config, counts: list[int], *, total_windows: int, timeout_s: float, output: Path | None,
                  start_ray: Callable[[], bool]) -> dict[str, Any]:
    """The table for each of ``counts``: one `stream_point` each, on a Ray started for it by
    ``start_ray`` (which returns whether it started one, to be shut down after); each point is
    also printed to stderr as it completes."""
    points = []
    for n in counts:
        started = start_ray()
        try:
            points.append(stream_point(base, n, total_windows=total_windows, timeout_s=timeout_s, output=output))
        finally:
            if started:
                ray.shutdown()
        print(json.dumps(points[-1]), file=sys.stderr, flush=True)
    return {"points": points, "scaling": scaling_summary(points), "cpus": os.cpu_count()}
