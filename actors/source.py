"""One stream's source: `StreamSource` decodes a stream into windows one ``next`` call at a time,
and the records its calls produce (`SourceEvent`, `ErrorRecord`).

A `actors.source_pool.SourcePoolActor` hosts many of them in one process. The runner keeps up to
``runtime.max_in_flight_per_stream`` ``next`` calls of a stream outstanding; they run in order,
one at a time, so a stream decodes ahead by at most that many windows and never queues more.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from threading import Event

from actors.metrics import Metrics
from pipeline.config import Config, StreamConfig
from pipeline.errors import LagSkipped, PipelineError
from pipeline.read import open_stream as read_stream
from pipeline.redact import redact_text
from pipeline.window import Window

OpenStream = Callable[..., Iterator[Window]]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorRecord:
    """One ``errors`` row: a problem a stream reported or ended with."""

    stream_id: str
    window_id: int | None
    t_wall: datetime
    kind: str
    message: str

    @classmethod
    def from_exception(cls, stream_id: str, exc: BaseException, window_id: int | None = None) -> "ErrorRecord":
        """The row for ``exc``; ``kind`` is its class name (the `pipeline.errors` class for ours),
        its message redacted (a library's error may quote a URL with its password)."""
        if isinstance(exc, PipelineError) and exc.window_id is not None:
            window_id = exc.window_id
        return cls(stream_id, window_id, datetime.now(timezone.utc), type(exc).__name__,
                   redact_text(str(exc) or repr(exc)))


@dataclass
class SourceEvent:
    """What one ``next`` call produced: a window's identity, or the end of the stream.

    ``errors`` holds problems reported since the previous call (they did not end the stream);
    ``failure`` is set when the stream ended badly (``done`` is then True too).
    """

    stream_id: str
    window_id: int | None = None
    has_video: bool = False
    has_audio: bool = False
    has_points: bool = False
    done: bool = False
    failure: ErrorRecord | None = None
    errors: list[ErrorRecord] = field(default_factory=list)
    decode_s: float = 0.0


def lower_priority(nice: int) -> None:
    """Raise this process's Linux niceness by ``nice`` (see ``runtime.helper_nice``); a no-op at 0
    or where the OS has no niceness."""
    if nice > 0 and hasattr(os, "nice"):
        os.nice(nice)


class StreamSource:
    """Reads one stream from ``start_window`` on (see the module docstring).

    ``max_windows`` caps the windows delivered in this run; ``realtime`` paces delivery at media
    speed, as a live feed would arrive. ``video_frames`` keeps only each window's last that many
    frames (None: all), those the model reads, so the others are neither shipped nor (synthetic
    rig) rendered; ``points`` ``(scans, max_points)`` likewise keeps only the points the model's
    points adapter reads (`pipeline.read.read_points`); nor is the synthetic rig's ground truth,
    which running the model does not read. ``open_stream`` is `pipeline.read.open_stream` unless a
    test passes another callable with its signature; ``metrics`` the process's `Metrics` (shared by
    the streams a pool hosts); ``stop`` the pool's drain signal (`pipeline.read.open_stream`).
    """

    def __init__(
        self,
        stream: StreamConfig,
        cfg: Config,
        *,
        start_window: int = 0,
        max_windows: int | None = None,
        realtime: bool = False,
        video_frames: int | None = None,
        points: tuple[int | None, int] | None = None,
        open_stream: OpenStream | None = None,
        metrics: Metrics | None = None,
        stop: Event | None = None,
    ) -> None:
        self._stream = stream
        self._cfg = cfg
        self._start_window = start_window
        self._max_windows = max_windows
        self._realtime = realtime
        self._video_frames = video_frames
        self._points = points
        self._open_stream = open_stream or read_stream
        self._it: Iterator[Window] | None = None
        self._reported: list[ErrorRecord] = []
        self._delivered = 0
        self._done = False
        self._last_window_id: int | None = None
        self._pace_origin: tuple[float, float] | None = None  # (media t_end, monotonic) of the first window
        self._metrics = metrics or Metrics()
        self._stop = stop
        # Modalities this stream should deliver: a window without one of them counts as missing it.
        self._expected = (
            {"video", "audio", "points"}
            if stream.synthetic is not None
            else {m for m in ("video", "audio", "points") if getattr(stream, m) is not None}
        )

    def _on_error(self, exc: PipelineError) -> None:
        self._reported.append(ErrorRecord.from_exception(self._stream.id, exc))
        self._metrics.errors.inc(tags={"stream": self._stream.id, "kind": type(exc).__name__})
        if isinstance(exc, LagSkipped):
            skipped = max(1, round(exc.seconds / self._cfg.window.hop))
            self._metrics.skipped_windows.inc(skipped, tags={"stream": self._stream.id})

    def _pace(self, window: Window) -> None:
        now = time.monotonic()
        if self._pace_origin is None:
            self._pace_origin = (window.t_end, now)
            return
        media0, wall0 = self._pace_origin
        delay = wall0 + (window.t_end - media0) - now
        if delay > 0:
            time.sleep(delay)

    def _end(self, failure: ErrorRecord | None = None) -> SourceEvent:
        self._done = True
        self._it = None
        errors, self._reported = self._reported, []
        if failure is not None:
            self._metrics.errors.inc(tags={"stream": self._stream.id, "kind": failure.kind})
            log.warning("stream %s ended: %s: %s", self._stream.id, failure.kind, failure.message)  # Ray's worker log
        return SourceEvent(self._stream.id, done=True, failure=failure, errors=errors)

    def next(self) -> tuple[SourceEvent, Window | None]:
        """The stream's next window and its event, or ``(done event, None)`` at the end."""
        if self._done:
            return self._end(), None
        if self._max_windows is not None and self._delivered >= self._max_windows:
            return self._end(), None
        t0 = time.perf_counter()
        try:
            if self._it is None:
                self._it = iter(
                    self._open_stream(
                        self._stream,
                        self._cfg,
                        on_error=self._on_error,
                        start_window=self._start_window,
                        video_frames=self._video_frames,
                        points=self._points,
                        truth=False,
                        stop=self._stop,
                    )
                )
            window = next(self._it)
        except StopIteration:
            return self._end(), None
        except Exception as exc:  # noqa: BLE001 - any failure ends this stream only, as an errors row
            after = None if self._last_window_id is None else self._last_window_id + 1
            return self._end(ErrorRecord.from_exception(self._stream.id, exc, after)), None
        decode_s = time.perf_counter() - t0
        if self._realtime:
            self._pace(window)
        self._delivered += 1
        self._last_window_id = window.window_id
        sid = self._stream.id
        self._metrics.windows_out.inc(tags={"stage": "source", "stream": sid})
        self._metrics.latency.observe(decode_s, tags={"stage": "source"})
        for modality, present in (("video", window.has_video), ("audio", window.has_audio), ("points", window.has_points)):
            if modality in self._expected and not present:
                self._metrics.missing_modality.inc(tags={"stream": sid, "modality": modality})
        errors, self._reported = self._reported, []
        event = SourceEvent(
            sid,
            window_id=window.window_id,
            has_video=window.has_video,
            has_audio=window.has_audio,
            has_points=window.has_points,
            errors=errors,
            decode_s=decode_s,
        )
        return event, window
