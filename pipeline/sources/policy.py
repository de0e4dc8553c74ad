"""What kind of source a stream reads, and how a live one is retried (no PyAV here).

- A **file** (a path, ``file://``) is read once; its end is the stream's end.
- A **live** source (a URL, or a capture device given by an FFmpeg ``format`` such as ``v4l2``,
  ``alsa`` or ``pulse``) gets open/read timeouts and reconnects after a drop. Its end of data is
  the stream's end only when the source is finite: an HTTP(S) body is finite (a clip served over
  HTTP); RTSP, RTMP, RTP/UDP, SRT and TCP streams and capture devices are endless, so their end
  of data is a drop and is reconnected. The stream's ``live`` key overrides the guess: ``live:
  true`` makes an HTTP source endless (an MJPEG or MPEG-TS camera over HTTP), ``live: false``
  makes any source finite.
- Reconnect attempts wait `backoff_s`: ``reconnect_backoff_s`` doubling up to ``max_backoff_s``.
  The first open is retried the same way, so a camera that is down at start is waited for.
"""

from __future__ import annotations

from dataclasses import dataclass

# URL schemes whose streams have no natural end: their end of data is a drop.
ENDLESS_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps", "rtmpt", "rtp", "udp", "srt", "tcp", "mms", "mmsh"})
# FFmpeg input formats that read a capture device rather than a file: live and endless.
DEVICE_FORMATS = frozenset(
    {"v4l2", "video4linux2", "alsa", "pulse", "jack", "oss", "sndio", "avfoundation", "dshow", "gdigrab",
     "x11grab", "kmsgrab", "fbdev", "decklink", "openal"}
)


@dataclass(frozen=True)
class SourceSettings:
    """Timeouts and reconnects for live sources (the config's ``sources`` section).

    ``reconnect_tries`` None retries for ever; ``max_backoff_s`` caps the doubling wait.
    """

    open_timeout_s: float = 10.0
    read_timeout_s: float = 5.0
    reconnect_tries: int | None = 5
    reconnect_backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    @classmethod
    def of(cls, section: object | None) -> SourceSettings:
        """Settings from a config section (any object or dict with these fields) or the defaults."""
        if section is None:
            return cls()
        if isinstance(section, SourceSettings):
            return section
        get = section.get if isinstance(section, dict) else lambda k, d: getattr(section, k, d)
        return cls(**{k: get(k, getattr(cls, k)) for k in cls.__dataclass_fields__})

    def gave_up(self, attempt: int) -> bool:
        """Whether reconnect attempt number ``attempt`` (1, 2, ...) is one too many."""
        return self.reconnect_tries is not None and attempt > self.reconnect_tries


def backoff_s(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before attempt ``attempt`` (1, 2, ...): ``base * 2**(attempt-1)``, at most ``cap``."""
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    return min(cap, base * 2.0 ** min(attempt - 1, 64))


def is_url(source: str) -> bool:
    """True for a URL (``scheme://...``) other than ``file://``."""
    scheme, sep, _ = source.partition("://")
    return bool(sep) and scheme.isalnum() and scheme.lower() != "file"


def is_device(format: str | None) -> bool:
    """True when FFmpeg input ``format`` reads a capture device (``v4l2``, ``alsa``, ``pulse``, ...)."""
    return format is not None and format.lower() in DEVICE_FORMATS


def is_live(source: str, format: str | None = None, live: bool | None = None) -> bool:
    """A URL, a capture device or a source marked ``live: true``: read with timeouts on a reader
    thread, reconnected after a drop."""
    return bool(live) or is_url(source) or is_device(format)


def is_endless(source: str, format: str | None = None, live: bool | None = None) -> bool:
    """Whether the source's end of data is a drop to reconnect (see the module docstring)."""
    if live is not None:
        return live
    scheme = source.partition("://")[0].lower() if is_url(source) else ""
    return scheme in ENDLESS_SCHEMES or is_device(format)


__all__ = ["SourceSettings", "backoff_s", "is_device", "is_endless", "is_live", "is_url"]
