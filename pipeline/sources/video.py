"""Video through PyAV: frame-threaded decoding, media-time stamps, decode-time resize and decimation.

`VideoDecoder` turns the packets of one container's video stream into `VideoFrame`s; the container
itself is read by `pipeline.sources.live.MediaReader` (files and URLs alike), which `video_frames`
wraps for a video-only source.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import av

from pipeline.errors import MissingStreamError, PipelineError
from pipeline.sources.base import VideoFrame
from pipeline.sources.live import MediaReader

# Slack for putting a frame in an fps slot: a frame time computed as 0.29999999999999999 belongs
# to slot 3 at 10 fps, as 0.3 does.
_SLOT_EPS = 1e-6


class VideoDecoder:
    """Decodes the first video stream of a container into `VideoFrame`s.

    size: ``(H, W)`` to resize to at decode time (in swscale, with the RGB conversion), or None to
          keep the first frame's size (later frames of another size are scaled to it, so a
          window's frames always stack).
    fps: keep at most one frame per ``1/fps`` slot of media time (slots are multiples of
         ``1/fps`` from media time 0, so the grid does not depend on where decoding started), or
         None to keep every frame. A kept frame lasts at least to the end of its slot.
    thread_type: PyAV codec thread type (``"AUTO"`` = frame and slice threads where the codec
         has them); ``thread_count`` 0 lets FFmpeg pick.
    """

    kind = "video"

    def __init__(
        self,
        *,
        size: tuple[int, int] | None = None,
        fps: float | None = None,
        thread_type: str = "AUTO",
        thread_count: int = 0,
    ) -> None:
        if size is not None and (len(size) != 2 or min(size) <= 0):
            raise ValueError(f"video size must be [H, W] with positive entries, got {size!r}")
        if fps is not None and fps <= 0:
            raise ValueError(f"video fps must be positive, got {fps!r}")
        self.size = tuple(size) if size is not None else None
        self.fps = fps
        self.thread_type = thread_type
        self.thread_count = thread_count
        self.offset = 0.0  # added to every time; set by the reader after a reconnect
        self.stream: av.video.stream.VideoStream | None = None
        self._default_duration = 0.04
        self._decimator = _Decimator(fps) if fps is not None else None
        self._last_t: float | None = None

    def open(self, container: av.container.InputContainer) -> av.stream.Stream:
        """Select and configure the container's first video stream."""
        if not container.streams.video:
            raise MissingStreamError("the container has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = self.thread_type
        stream.thread_count = self.thread_count
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self._default_duration = float(1 / rate) if rate else 0.04
        self.stream = stream
        return stream

    def decode(self, packet: av.Packet | None) -> list[VideoFrame]:
        """Frames from one packet (None flushes the decoder's delayed frames)."""
        assert self.stream is not None, "open() first"
        out = []
        for frame in self.stream.codec_context.decode(packet):
            if frame.time_base is None:  # frames flushed without a packet carry no time base
                frame.time_base = self.stream.time_base
            record = self._convert(frame)
            if record is not None:
                out.append(record)
        return out

    def flush(self) -> list[VideoFrame]:
        """The frames the (frame-threaded) decoder still holds."""
        try:
            return self.decode(None)
        except (av.error.EOFError, av.error.InvalidDataError):
            return []

    def _convert(self, frame: av.VideoFrame) -> VideoFrame | None:
        if frame.pts is not None:
            t = float(frame.pts * frame.time_base) + self.offset
        elif self._last_t is not None:
            t = self._last_t + self._default_duration
        else:
            t = self.offset
        self._last_t = t
        duration = float(frame.duration * frame.time_base) if frame.duration else self._default_duration
        if self._decimator is not None:
            duration = self._decimator.keep(t, duration)
            if duration is None:
                return None
        if self.size is None:
            self.size = (frame.height, frame.width)
        height, width = self.size
        if (height, width) == (frame.height, frame.width):
            image = frame.to_ndarray(format="rgb24")
        else:
            image = frame.to_ndarray(format="rgb24", width=width, height=height)
        return VideoFrame(t=t, duration=duration, image=image)


class _Decimator:
    """Keeps the first frame of each ``1/fps`` slot of media time (slots counted from t = 0)."""

    def __init__(self, fps: float) -> None:
        self.fps = fps
        self._last_slot: int | None = None

    def keep(self, t: float, duration: float) -> float | None:
        """The kept frame's duration (at least to the end of its slot), or None to drop it."""
        slot = math.floor(t * self.fps + _SLOT_EPS)
        if self._last_slot is not None and slot <= self._last_slot:
            return None
        self._last_slot = slot
        return max(duration, (slot + 1) / self.fps - t)


def decimate(frames: Iterator[Any], fps: float) -> Iterator[Any]:
    """Frames of an already-decoded source (the synthetic rig) thinned like ``video.fps`` does.

    Items that are not `VideoFrame`s (e.g. `SourceBreak` markers) pass through.
    """
    decimator = _Decimator(fps)
    for frame in frames:
        if isinstance(frame, VideoFrame):
            duration = decimator.keep(frame.t, frame.duration)
            if duration is None:
                continue
            frame = VideoFrame(t=frame.t, duration=duration, image=frame.image, t_wall=frame.t_wall)
        yield frame


def video_frames(
    source: str,
    *,
    stream_id: str,
    size: tuple[int, int] | None = None,
    fps: float | None = None,
    settings: object | None = None,
    on_error: Callable[[PipelineError], None] | None = None,
) -> Iterator:
    """`VideoFrame`s of a file or URL's video track (and `SourceBreak` markers after reconnects).

    ``settings`` is the config's ``sources`` section (timeouts, reconnects) or None for defaults.
    """
    reader = MediaReader(
        source, [VideoDecoder(size=size, fps=fps)], stream_id=stream_id, settings=settings, on_error=on_error
    )
    return reader.tracks()["video"]


__all__ = ["VideoDecoder", "decimate", "video_frames"]
