"""SourcePoolActor: one process that decodes many streams at once, each a `StreamSource`.

A stream costs its decoding, not a process: the pool hosts the streams the runner assigns to it
(`actors.assign`) and runs their ``next`` calls on a thread pool (Ray's threaded actor), so the
streams decode concurrently (PyAV and numpy release the GIL while they work; a paced stream
sleeps without holding anyone up). A stream's calls run one at a time in the order the runner
numbered them (``seq``): Ray does not order a threaded actor's calls, so a call waits for its
turn. The number of calls the runner keeps outstanding is bounded by its in-flight bounds, and
the actor has a thread for each, so a waiting call never blocks another stream.

If the process dies Ray restarts it empty; the runner adds the streams again with `add`, each
from the window after the last one it received (`actors.pools`). The module imports neither
torch nor the model.
"""

from __future__ import annotations

import os
import threading

import ray

from actors.memory import HeapTrimmer
from actors.metrics import Metrics
from actors.source import OpenStream, SourceEvent, StreamSource, lower_priority
from pipeline.config import Config, StreamConfig
from pipeline.logs import install_redaction
from pipeline.window import Window


class _Hosted:
    """One stream in the pool: its source and whose turn it is (the next ``seq`` to run)."""

    def __init__(self, source: StreamSource, first_seq: int) -> None:
        self.source = source
        self.turn = first_seq
        self.cond = threading.Condition()


class SourcePoolActor:
    """Hosts many streams' sources (see the module docstring).

    ``index`` names the pool in messages; ``realtime`` paces every stream at media speed;
    ``shipped`` is `actors.plan.shipped_inputs` (trailing frames, points per window);
    ``open_stream`` as in `StreamSource`. ``cfg.runtime.helper_nice`` lowers the process's CPU
    priority.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        index: int = 0,
        realtime: bool = False,
        shipped: tuple[int | None, tuple[int | None, int] | None] = (None, None),
        open_stream: OpenStream | None = None,
    ) -> None:
        lower_priority(cfg.runtime.helper_nice)
        install_redaction()  # what a library logs here of a camera URL reaches Ray's worker log redacted
        self._cfg = cfg
        self._index = index
        self._realtime = realtime
        self._frames, self._points = shipped
        self._open_stream = open_stream
        self._streams: dict[str, _Hosted] = {}
        self._lock = threading.Lock()
        self._metrics = Metrics()
        self._trim = HeapTrimmer()
        self._stopping = threading.Event()

    def info(self) -> dict[str, object]:
        """The pool's index, process id, node id and hosted streams (answers once it is up)."""
        return {
            "index": self._index,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "streams": sorted(self._streams),
        }

    def add(self, streams: list[tuple[StreamConfig, int, int, int | None]]) -> None:
        """Host each ``(stream, start_window, first_seq, max_windows)``: from ``start_window`` on,
        its first ``next`` call being number ``first_seq``, at most ``max_windows`` windows (None:
        all). A stream added again replaces its earlier source."""
        for stream, start, first_seq, max_windows in streams:
            source = StreamSource(
                stream, self._cfg, start_window=start, max_windows=max_windows, realtime=self._realtime,
                video_frames=self._frames, points=self._points, open_stream=self._open_stream,
                metrics=self._metrics, stop=self._stopping,
            )
            with self._lock:
                self._streams[stream.id] = _Hosted(source, first_seq)

    def drop(self, stream_id: str) -> None:
        """Stop hosting ``stream_id`` (removed from the run; its calls are over)."""
        with self._lock:
            self._streams.pop(stream_id, None)

    def stop(self) -> None:
        """The run drains: a live source waiting to reconnect (a camera that is down) ends its
        stream instead of holding its ``next`` call, and the drain, open."""
        self._stopping.set()

    @ray.method(num_returns=2)
    def next(self, stream_id: str, seq: int) -> tuple[SourceEvent, Window | None]:
        """Stream ``stream_id``'s next window and its event, as its ``seq``-th call (waits for the
        calls numbered before it); ``(done event, None)`` at its end."""
        with self._lock:
            hosted = self._streams.get(stream_id)
        if hosted is None:
            raise KeyError(f"source pool actor {self._index} does not host stream {stream_id!r}")
        with hosted.cond:
            hosted.cond.wait_for(lambda: hosted.turn >= seq)
            if hosted.turn != seq:
                raise RuntimeError(f"stream {stream_id!r}: call {seq} came after call {hosted.turn - 1}")
        try:
            return hosted.source.next()
        finally:
            with hosted.cond:
                hosted.turn += 1
                hosted.cond.notify_all()
            self._trim()
