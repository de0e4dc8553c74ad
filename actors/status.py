"""What a run says about itself where no one watches a terminal: the endpoints at start, a status
line every so often, and the build it runs.

`StatusLine` is an ``on_progress`` callback that logs one line every ``every_s`` seconds
(``--status-every``, 30 by default) under systemd or Kubernetes (no TTY) or with ``--no-progress``: windows/s since the last
line, the largest lag, restarts, and each stream's state, windows and lag, also as the record's
``status`` field (JSON logs). A stream's *lag* is how far its decoding trails real time: the wall
seconds since its first window of this run less the media seconds its windows have advanced
since (window ids times the hop), never below 0. A replay faster than real time stays at 0; a
paced or live stream whose model cannot keep up grows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import ray
import torch

from actors.metrics import Metrics
from actors.streams import RunningPipeline

log = logging.getLogger("perceiver_stream")


class StatusLine:
    """Logs the run's status every ``every_s`` seconds (see the module docstring); ``hop`` is the
    config's ``window.hop`` in seconds."""

    def __init__(self, hop: float, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.hop = hop
        self.every_s = every_s
        self._clock = clock
        self._last: tuple[float, int] | None = None  # (time, windows) of the last line
        self._first: dict[str, tuple[float, int]] = {}  # per stream: (time, next window) when first seen decoding

    def lag(self, p: RunningPipeline, now: float) -> dict[str, float]:
        """Each stream's lag in seconds (streams still running whose source has delivered)."""
        out = {}
        for sid, st in p.streams.items():
            if st.next_window > st.start_window and sid not in self._first:
                self._first[sid] = (now, st.next_window)
            if sid in self._first and not st.finished:
                t0, w0 = self._first[sid]
                out[sid] = max(0.0, (now - t0) - (st.next_window - w0) * self.hop)
        return out

    def update(self, p: RunningPipeline) -> None:
        """The ``on_progress`` callback: track the lags, log a line when one is due."""
        now = self._clock()
        lags = self.lag(p, now)
        if self._last is None:
            self._last = (now, p.windows)
            return
        then, windows = self._last
        if now - then < self.every_s:
            return
        self._last = (now, p.windows)
        rate = (p.windows - windows) / max(now - then, 1e-9)
        streams: dict[str, dict[str, Any]] = {sid: {"state": str(st.state), "windows": st.windows}
                                               for sid, st in p.streams.items()}
        for sid, lag in lags.items():
            streams[sid]["lag_s"] = round(lag, 1)
        worst = max(lags.values(), default=0.0)
        per_stream = ", ".join(
            f"{sid} {s['state']} {s['windows']}" + (f" lag {s['lag_s']:.1f} s" if "lag_s" in s else "")
            for sid, s in streams.items()
        )
        status = {"windows": p.windows, "windows_per_s": round(rate, 2), "lag_s": round(worst, 1),
                  "restarts": p.restarts, "in_flight": p.in_flight, "streams": streams}
        log.info(
            f"status: {p.windows} windows, {rate:.1f}/s, lag {worst:.1f} s, restarts {p.restarts}, "
            f"in flight {p.in_flight}{', draining' if p.stopping else ''}; {per_stream}",
            extra={"status": status},
        )


def announce(dashboard_url: str | None, version: str) -> dict[str, Any]:
    """Log where to watch the run (the Ray dashboard at ``dashboard_url``, this node's Prometheus
    metrics endpoint) and set ``pstream_build_info`` (perceiver-stream ``version``, torch's, Ray's);
    returns what was logged (``dashboard``, ``metrics``)."""
    here = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n["NodeID"] == here), None)
    metrics = None if node is None else f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    dashboard = f"http://{dashboard_url}" if dashboard_url else None
    log.info(f"Ray dashboard: {dashboard or 'off'}", extra={"dashboard": dashboard})
    log.info(f"Prometheus metrics (ray_pstream_*): {metrics or 'unknown'}", extra={"metrics": metrics})
    Metrics().build_info.set(1, tags={"version": version, "torch": torch.__version__, "ray": ray.__version__})
    return {"dashboard": dashboard, "metrics": metrics}
