"""Cutting one stream's modalities into media-time windows (DESIGN: "The unit of data").

``t0`` is the earliest first-sample time across the modalities; the stream ends at its last
sample's time plus that sample's duration. Window ``k`` covers ``[t0 + k*hop, t0 + k*hop + seconds)``
and has ``window_id = k``; only complete windows (ending at or before the stream's end) are
emitted. A window with no sample of any modality gives no `Window`, and the next one has
``gap=True``; so does the first window after a source's `SourceBreak` (a reconnect) and, when
resuming with ``start_window=N``, the first window emitted.

A sample belongs to a window when its time ``t`` satisfies ``start - EPS <= t < end - EPS``
(``EPS`` = 1 µs absorbs float rounding of ``t0 + k*hop``, far below any sample period). An audio
chunk contributes the samples whose own times (``chunk.t + i/rate``) fall in the window, laid
on one sample grid from the first of them (a hole between chunks is silence, so sample ``j``
is always at ``audio_t0 + j/rate``).

Streaming: sources are pulled lazily, the one that is furthest behind first, and window ``k`` is
emitted as soon as every unfinished source has produced a sample at or after its end, so memory
holds about one window of samples. When a source raises, the windows that its samples completed
are still emitted, then the error is re-raised.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from pipeline.errors import DecodeError, PipelineError
from pipeline.sources.base import AudioChunk, PointScan, VideoFrame
from pipeline.sources.live import SourceBreak
from pipeline.window import Truth, Window

EPS = 1e-6
_TYPES = {"video": VideoFrame, "audio": AudioChunk, "points": PointScan}
# Video frames are copied once into a preallocated "slab" so that a window's frames are a view
# of it, not a fresh stack (overlapping windows would otherwise copy every frame twice). A slab
# holds about SLAB_BYTES but no more than SLAB_FRAMES frames (and at least 4x the frames waiting
# for a window); the frames still waiting when it fills move to the next one. A full slab is
# recycled once no window view of it is alive: writing into fresh memory costs page faults that
# take ~10x longer than the copy itself. The frame cap matters for small frames: a 32 MiB slab
# of 64x64 frames lasts 110 s at 25 fps, and its pages become resident as frames fill it, so a
# stream's memory grew for minutes (3 slabs, ~96 MiB) and looked like a leak.
SLAB_BYTES = 32 << 20
SLAB_FRAMES = 256
_RETIRED_SLABS = 2


class _Frame:
    """A video frame whose image is row ``index`` of ``slab``."""

    __slots__ = ("t", "duration", "slab", "index", "t_wall")

    def __init__(self, t: float, duration: float, slab: np.ndarray, index: int, t_wall: float | None) -> None:
        self.t, self.duration, self.slab, self.index, self.t_wall = t, duration, slab, index, t_wall


class _Slabs:
    """Back-to-back frame storage for one video track (see `SLAB_BYTES`)."""

    def __init__(self) -> None:
        self.slab: np.ndarray | None = None
        self.used = 0
        self.retired: list[np.ndarray] = []

    def add(self, frame: VideoFrame, waiting: deque) -> _Frame:
        image = np.asarray(frame.image)
        if self.slab is None or self.used == len(self.slab) or self.slab.shape[1:] != image.shape:
            self._renew(image, waiting)
        self.slab[self.used] = image
        self.used += 1
        return _Frame(float(frame.t), float(frame.duration), self.slab, self.used - 1, frame.t_wall)

    def _renew(self, image: np.ndarray, waiting: deque) -> None:
        keep = [f for f in waiting if f.slab.shape[1:] == image.shape]
        need = 4 * (len(keep) + 1)
        slab = self._recycled(image, need)
        if slab is None:
            capacity = max(need, min(SLAB_FRAMES, SLAB_BYTES // max(image.nbytes, 1)))
            slab = np.empty((capacity, *image.shape), image.dtype)
        for i, f in enumerate(keep):
            slab[i] = f.slab[f.index]
            f.slab, f.index = slab, i
        if self.slab is not None:
            self.retired = [self.slab, *self.retired][:_RETIRED_SLABS]
        self.slab, self.used = slab, len(keep)

    def _recycled(self, image: np.ndarray, need: int) -> np.ndarray | None:
        for i in range(len(self.retired)):
            slab = self.retired[i]
            # References: the list, `slab`, getrefcount's argument (no enumerate: its cached
            # tuple would hold one more). Any more means a window, or a view a consumer cut
            # from one, still shows these bytes.
            if slab.shape[1:] == image.shape and len(slab) >= need // 2 and sys.getrefcount(slab) <= 3:
                del self.retired[i]
                return slab
        return None


class _Track:
    """One modality's source: its pending samples and how far it has got."""

    def __init__(self, modality: str, iterator: Iterator[Any]) -> None:
        self.modality = modality
        self.iterator = iterator
        self.buf: deque = deque()
        self.last_t = -math.inf  # time of the latest sample pulled (sources are non-decreasing)
        self.end = -math.inf  # latest sample end (t + duration)
        self.done = False
        self.first_t: float | None = None
        self.slabs = _Slabs() if modality == "video" else None


def windows(
    stream_id: str,
    sources: dict[str, Iterator[Any]],
    *,
    seconds: float,
    hop: float,
    truth: Callable[[float, float, np.ndarray | None], Truth] | None = None,
    start_window: int = 0,
    on_error: Callable[[PipelineError], None] | None = None,
) -> Iterator[Window]:
    """Windows of one stream from per-modality sources.

    sources: ``{"video": ..., "audio": ..., "points": ...}`` (any subset), iterators of
        `VideoFrame` / `AudioChunk` / `PointScan` in non-decreasing time, optionally with
        `SourceBreak` markers.
    truth: ``truth(t_start, t_end, video_t) -> Truth`` for each emitted window (synthetic rig).
    start_window: resume: windows with ids below it are skipped, the first emitted has gap=True.
    on_error: receives a `DecodeError` when samples arrive after their window was emitted
        (timestamps that go backwards); they are dropped from that window.
    """
    if not seconds > 0 or not hop > 0:
        raise ValueError(f"window seconds and hop must be positive, got {seconds!r}, {hop!r}")
    if start_window < 0:
        raise ValueError(f"start_window must be >= 0, got {start_window!r}")
    unknown = set(sources) - set(_TYPES)
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}; expected some of {sorted(_TYPES)}")
    return _Windower(stream_id, sources, seconds, hop, truth, start_window, on_error).run()


class _Windower:
    def __init__(self, stream_id, sources, seconds, hop, truth, start_window, on_error) -> None:
        self.stream_id = stream_id
        self.tracks = [_Track(m, iter(it)) for m, it in sources.items() if it is not None]
        self.seconds = float(seconds)
        self.hop = float(hop)
        self.truth = truth
        self.start_window = start_window
        self.on_error = on_error
        self.error: BaseException | None = None
        self.horizon = math.inf  # after a source failed: the end of what it delivered
        self.break_t = math.inf  # earliest unconsumed SourceBreak
        self.emitted_end = -math.inf  # end of the last emitted window
        self.late: dict[str, int] = {}

    # -- pulling ------------------------------------------------------------------------------

    def _pull(self, tr: _Track) -> None:
        """Take one item from a track's source (sample, break marker, end or failure)."""
        try:
            item = next(tr.iterator)
        except StopIteration:
            tr.done = True
            return
        except Exception as e:  # noqa: BLE001 - any failure ends the stream after a flush
            tr.done = True
            if self.error is None:
                self.error = e
                self.horizon = tr.end if tr.end > -math.inf else -math.inf
            return
        if isinstance(item, SourceBreak):
            self.break_t = min(self.break_t, item.t)
            return
        if not isinstance(item, _TYPES[tr.modality]):
            raise TypeError(f"source {tr.modality!r} of stream {self.stream_id!r} yielded {type(item).__name__}")
        t = float(item.t)
        if tr.first_t is None:
            tr.first_t = t
        if t < self.emitted_end - EPS:
            self.late[tr.modality] = self.late.get(tr.modality, 0) + 1
        tr.last_t = max(tr.last_t, t)
        tr.end = max(tr.end, t + item.duration)
        tr.buf.append(tr.slabs.add(item, tr.buf) if tr.slabs is not None else item)

    def _advance(self, te: float) -> None:
        """Pull until every unfinished track has reached ``te`` (or failed/ended)."""
        while True:
            lagging = [tr for tr in self.tracks if not tr.done and tr.last_t < te - EPS]
            if not lagging:
                return
            self._pull(min(lagging, key=lambda tr: tr.last_t))
            if self.error is not None and te > self.horizon + EPS:
                return

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> Iterator[Window]:
        for tr in self.tracks:
            while tr.first_t is None and not tr.done:
                self._pull(tr)
        starts = [tr.first_t for tr in self.tracks if tr.first_t is not None]
        if not starts:
            if self.error is not None:
                raise self.error
            return
        t0 = min(starts)
        self.break_t = math.inf  # a break before any data is no break
        k = self.start_window
        gap = self.start_window > 0
        while True:
            ts = t0 + k * self.hop
            te = ts + self.seconds
            self._advance(te)
            stream_end = max(tr.end for tr in self.tracks)
            if self.error is not None:
                if te > self.horizon + EPS or all(tr.done for tr in self.tracks) and te > stream_end + EPS:
                    raise self.error
            elif all(tr.done for tr in self.tracks) and te > stream_end + EPS:
                return
            self._prune(ts)
            window = self._build(k, ts, te)
            if window is None:
                gap = True
                k = max(k + 1, self._next_with_data(t0) - 1)
                continue
            if te > self.break_t + EPS:
                gap = True
                self.break_t = math.inf
            window.gap = gap
            gap = False
            self._report_late(k)
            self.emitted_end = te
            yield window
            k += 1
            self._prune(t0 + k * self.hop)

    def _next_with_data(self, t0: float) -> int:
        """Lowest window id that could hold the earliest buffered sample (a lower bound)."""
        firsts = [tr.buf[0].t for tr in self.tracks if tr.buf]
        if not firsts:
            return 0
        return math.floor((min(firsts) - t0 - self.seconds + EPS) / self.hop) + 1

    def _prune(self, ts: float) -> None:
        """Drop samples that end before ``ts``: no window from here on can hold them."""
        for tr in self.tracks:
            buf = tr.buf
            if tr.modality == "audio":
                while buf and buf[0].t + len(buf[0].samples) / buf[0].rate <= ts - EPS:
                    buf.popleft()
            else:
                while buf and buf[0].t < ts - EPS:
                    buf.popleft()

    def _report_late(self, k: int) -> None:
        if not self.late or self.on_error is None:
            self.late.clear()
            return
        for modality, n in sorted(self.late.items()):
            self.on_error(
                DecodeError(
                    f"{n} {modality} sample(s) arrived after their window was emitted (timestamps went "
                    "backwards); dropped from that window",
                    stream_id=self.stream_id,
                    source=modality,
                    window_id=k,
                )
            )
        self.late.clear()

    # -- building a window --------------------------------------------------------------------

    def _build(self, k: int, ts: float, te: float) -> Window | None:
        lo, hi = ts - EPS, te - EPS
        w = Window(stream_id=self.stream_id, window_id=k, t_start=ts, t_end=te)
        walls = []
        for tr in self.tracks:
            if tr.modality == "audio":
                walls.append(_audio_into(w, tr.buf, lo, hi))
                continue
            items = []
            for item in tr.buf:
                if item.t >= hi:
                    break
                if item.t >= lo:
                    items.append(item)
            if not items:
                continue
            times = np.array([it.t for it in items], np.float64)
            walls.extend(getattr(it, "t_wall", None) for it in items)
            if tr.modality == "video":
                w.video = _frames_array(items)
                w.video_t = times
            else:
                w.points = [it.points for it in items]
                w.points_t = times
        if w.video is None and w.audio is None and w.points is None:
            return None
        known = [t for t in walls if t is not None]
        w.t_wall = max(known) if known else None
        if self.truth is not None:
            w.truth = self.truth(ts, te, w.video_t)
        return w


def _frames_array(items: list[_Frame]) -> np.ndarray:
    """The frames as one read-only array: a view of their slab when they lie back to back.

    Read-only because overlapping windows share these bytes.
    """
    first, last = items[0], items[-1]
    if last.slab is first.slab and last.index - first.index == len(items) - 1:
        video = first.slab[first.index : last.index + 1]
    else:
        video = np.stack([f.slab[f.index] for f in items])
    video.flags.writeable = False
    return video


def _audio_into(w: Window, chunks: deque, lo: float, hi: float) -> float | None:
    """Put the samples of ``chunks`` with times in ``[lo, hi)`` on one grid in ``w``; the wall
    clock of the last sample taken (a chunk's ``t_wall`` less the part of it left out), or None."""
    pieces = []  # (time of first sample taken, samples)
    wall = None
    for c in chunks:
        if c.t >= hi:
            break
        n, rate = len(c.samples), c.rate
        i0 = min(n, max(0, math.ceil((lo - c.t) * rate)))
        i1 = min(n, max(0, math.ceil((hi - c.t) * rate)))
        if i1 > i0:
            pieces.append((c.t + i0 / rate, c.samples[i0:i1], rate))
            if c.t_wall is not None:
                wall = max(wall or -math.inf, c.t_wall - (n - i1) / rate)
    if not pieces:
        return None
    t_first = min(p[0] for p in pieces)
    rate = pieces[0][2]
    offsets = [round((t - t_first) * rate) for t, _, _ in pieces]
    contiguous = all(offsets[i] == offsets[i - 1] + len(pieces[i - 1][1]) for i in range(1, len(pieces)))
    if contiguous:
        audio = np.concatenate([p[1] for p in pieces]) if len(pieces) > 1 else pieces[0][1].copy()
    else:
        length = max(o + len(p[1]) for o, p in zip(offsets, pieces))
        audio = np.zeros((length, pieces[0][1].shape[1]), np.float32)
        for o, (_, samples, _) in zip(offsets, pieces):
            audio[o : o + len(samples)] = samples
    w.audio = audio
    w.audio_rate = rate
    w.audio_t0 = t_first
    return wall


__all__ = ["EPS", "windows"]
