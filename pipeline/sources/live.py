"""Reading one media container, file or live URL: open/read timeouts, stalls, reconnects.

`MediaReader` demuxes a container once and feeds its packets to one decoder per modality
(`VideoDecoder`, `AudioDecoder`), so ``audio: same`` costs one demuxer and, for a live URL, one
connection. `MediaReader.tracks` hands out one iterator per modality for the windower.

Files: a missing, empty or non-media file raises at open; a packet the decoder rejects is reported
(`DecodeError` through ``on_error``) and skipped; a container that ends well before the duration
its index declares (MP4, Matroska, AVI, WAV, FLAC, Ogg) raises `DecodeError` after the frames it
did hold.

Live URLs (``rtsp://``, ``http(s)://``, ...): opening must finish within ``open_timeout_s``; a read
that delivers nothing for ``read_timeout_s`` is a stall (FFmpeg's interrupt callback, through
PyAV's ``timeout=(open, read)``); a stall, a dropped connection or corrupt data closes the
connection and reopens it after ``reconnect_backoff_s * 2**(attempt-1)`` seconds, up to
``reconnect_tries`` attempts in a row (a reconnect that delivers data resets the count). Each
reconnect is reported as `SourceReconnected`, and the iterators yield a `SourceBreak` so the next
window has ``gap=True``. Media time continues: if the new connection's clock restarts behind
where the old one stopped, its times are shifted to resume there. The first open is not retried,
so a wrong URL fails fast. A live source that ends normally (end of file over HTTP) ends the stream.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import av

from pipeline.sources.base import VideoFrame
from pipeline.errors import (
    DecodeError,
    MissingStreamError,
    PipelineError,
    SourceError,
    SourceNotFound,
    SourceOpenError,
    SourceReconnected,
    SourceTimeout,
)

# Formats whose index states the real duration; elsewhere (MPEG-TS, raw streams) FFmpeg guesses
# it from the bit rate, so a short file is not evidence of truncation.
_INDEXED_FORMATS = {"mov", "mp4", "matroska", "webm", "avi", "wav", "flac", "ogg"}
# How far short of the declared duration a file may end before it counts as truncated.
_TRUNCATION_TOLERANCE_S = 0.5
# Rejected packets in a row, with no frame in between, after which a file counts as corrupt.
_MAX_BAD_PACKETS = 50
# Records that start this far before the resume point of a reconnect repeat what was delivered.
_EPS = 1e-6


@dataclass(frozen=True)
class SourceBreak:
    """A discontinuity in a source (a reconnect) after media time ``t``: the next window has gap=True."""

    t: float


@dataclass(frozen=True)
class SourceSettings:
    """Timeouts and reconnects for live sources (the config's ``sources`` section)."""

    open_timeout_s: float = 10.0
    read_timeout_s: float = 5.0
    reconnect_tries: int = 5
    reconnect_backoff_s: float = 1.0

    @classmethod
    def of(cls, section: object | None) -> SourceSettings:
        """Settings from a config section (any object or dict with these fields) or the defaults."""
        if section is None:
            return cls()
        if isinstance(section, SourceSettings):
            return section
        get = section.get if isinstance(section, dict) else lambda k, d: getattr(section, k, d)
        return cls(**{k: get(k, getattr(cls, k)) for k in cls.__dataclass_fields__})


class Decoder(Protocol):
    """What `MediaReader` needs from a per-modality decoder (`VideoDecoder`, `AudioDecoder`)."""

    kind: str
    offset: float

    def open(self, container: av.container.InputContainer) -> av.stream.Stream: ...

    def decode(self, packet: av.Packet | None) -> list[Any]: ...

    def flush(self) -> list[Any]: ...


def is_url(source: str) -> bool:
    """True for a URL (``scheme://...``) other than ``file://``: a live source."""
    scheme, sep, _ = source.partition("://")
    return bool(sep) and scheme.isalnum() and scheme.lower() != "file"


class _Dropped(Exception):
    """A live connection stalled, dropped or sent garbage (internal: triggers a reconnect)."""

    def __init__(self, cause: str, stalled: bool) -> None:
        super().__init__(cause)
        self.stalled = stalled


class MediaReader:
    """Reads one container (file or URL) and decodes its video and/or audio stream.

    Iterating yields records of every decoder (`VideoFrame`, `AudioChunk`) in demux order and a
    `SourceBreak` after each reconnect; `tracks` splits that into one iterator per modality.
    Errors are `pipeline` errors naming ``stream_id`` and the source.
    """

    def __init__(
        self,
        source: str,
        decoders: list[Decoder],
        *,
        stream_id: str,
        settings: object | None = None,
        on_error: Callable[[PipelineError], None] | None = None,
    ) -> None:
        self.source = str(source)
        self.decoders = list(decoders)
        self.stream_id = stream_id
        self.settings = SourceSettings.of(settings)
        self.on_error = on_error
        self.live = is_url(self.source)
        self._last_end: float | None = None  # over all modalities, for resuming after a break
        self._ends: dict[str, float] = {}  # per modality, for the truncation check

    # -- errors -------------------------------------------------------------------------------

    def _error(self, cls: type[PipelineError], message: str) -> PipelineError:
        return cls(message, stream_id=self.stream_id, source=self.source)

    def _report(self, error: PipelineError) -> None:
        if self.on_error is not None:
            self.on_error(error)

    # -- opening ------------------------------------------------------------------------------

    def _open(self) -> av.container.InputContainer:
        s = self.settings
        if not self.live:
            path = Path(self.source.removeprefix("file://"))
            if not path.exists():
                raise self._error(SourceNotFound, "no such file")
            if path.is_dir():
                raise self._error(SourceOpenError, "is a folder, not a media file")
            if path.stat().st_size == 0:
                raise self._error(SourceOpenError, "the file is empty (0 bytes)")
        try:
            if self.live:
                container = av.open(self.source, timeout=(s.open_timeout_s, s.read_timeout_s))
            else:
                container = av.open(self.source)
        except av.error.ExitError:
            raise self._error(SourceTimeout, f"did not open within open_timeout_s={s.open_timeout_s}") from None
        except FileNotFoundError as e:
            cls = SourceOpenError if self.live else SourceNotFound
            raise self._error(cls, f"not found ({_reason(e)})") from None
        except av.error.InvalidDataError as e:
            raise self._error(SourceOpenError, f"not a readable media container ({_reason(e)})") from None
        except (av.error.FFmpegError, OSError) as e:
            raise self._error(SourceOpenError, f"could not be opened ({_reason(e)})") from None
        try:
            for d in self.decoders:
                d.open(container)
        except MissingStreamError as e:
            container.close()
            raise self._error(MissingStreamError, e.cause) from None
        return container

    # -- reading ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        container = self._open()
        failures = 0  # reconnect attempts since data last flowed
        resume_t: float | None = None
        while True:
            delivered = False
            try:
                for record in self._decode(container, resume_t):
                    delivered = True
                    yield record
                if not self.live:
                    self._check_complete(container)
                return
            except _Dropped as drop:
                for d in self.decoders:
                    for record in d.flush():
                        yield self._stamp(record)
                cause = str(drop)
                stalled = drop.stalled
            finally:
                container.close()
            if delivered:
                failures = 0
            container = None
            while container is None:
                failures += 1
                if failures > self.settings.reconnect_tries:
                    cls = SourceTimeout if stalled else SourceError
                    raise self._error(
                        cls, f"{cause}; gave up after reconnect_tries={self.settings.reconnect_tries} attempts"
                    )
                time.sleep(self.settings.reconnect_backoff_s * 2 ** (failures - 1))
                try:
                    container = self._open()
                except SourceError as e:
                    cause, stalled = f"{cause}; reconnect {failures} failed: {e.cause}", isinstance(e, SourceTimeout)
            self._report(self._error(SourceReconnected, f"{cause}; reconnected (attempt {failures})"))
            resume_t = self._last_end
            if resume_t is not None:
                yield SourceBreak(resume_t)

    def _stamp(self, record: Any) -> Any:
        end = record.t + record.duration
        kind = _kind_of(record)
        self._ends[kind] = max(end, self._ends.get(kind, end))
        if self._last_end is None or end > self._last_end:
            self._last_end = end
        return record

    def _decode(self, container: av.container.InputContainer, resume_t: float | None) -> Iterator[Any]:
        """Records of one connection; after a reconnect, times resume at ``resume_t``."""
        by_stream = {d.stream.index: d for d in self.decoders}
        rebase = resume_t is not None
        bad_run = 0
        demux = container.demux([d.stream for d in self.decoders])
        while True:
            try:
                packet = next(demux)
            except StopIteration:
                return
            except av.error.ExitError:
                if self.live:
                    raise _Dropped(f"stalled: no data for read_timeout_s={self.settings.read_timeout_s}", True)
                raise self._error(DecodeError, "reading was interrupted") from None
            except (av.error.FFmpegError, OSError) as e:
                if self.live:
                    raise _Dropped(f"connection dropped ({_reason(e)})", False) from None
                raise self._error(DecodeError, f"corrupt container ({_reason(e)})") from None
            decoder = by_stream[packet.stream.index]
            if rebase and packet.pts is not None:
                # Keep media time running across the break: a clock that restarted is shifted on.
                raw = float(packet.pts * packet.time_base)
                for d in self.decoders:
                    if raw + d.offset < resume_t:
                        d.offset = resume_t - raw
                rebase = False
            try:
                records = decoder.decode(packet)
            except av.error.FFmpegError as e:
                if self.live:
                    raise _Dropped(f"corrupt data ({_reason(e)})", False) from None
                bad_run += 1
                self._report(self._error(DecodeError, f"skipped a {decoder.kind} packet the decoder rejected ({_reason(e)})"))
                if bad_run >= _MAX_BAD_PACKETS:
                    raise self._error(DecodeError, f"corrupt: {bad_run} {decoder.kind} packets in a row could not be decoded") from None
                continue
            if records:
                bad_run = 0
            for record in records:
                if resume_t is not None and record.t < resume_t - _EPS:
                    continue
                yield self._stamp(record)

    def _check_complete(self, container: av.container.InputContainer) -> None:
        """Raise `DecodeError` when a file ended well before the duration its index declares."""
        if not _INDEXED_FORMATS.intersection(container.format.name.split(",")):
            return
        ends = []
        for d in self.decoders:
            s = d.stream
            if s.duration is not None and s.duration > 0:
                ends.append((d.kind, float((s.start_time or 0) * s.time_base + s.duration * s.time_base)))
        if len(ends) < len(self.decoders):
            # Without per-stream durations only the container's can be used, and only when every
            # track it holds is being decoded (a short audio track is not a truncated video).
            n_av = len(container.streams.video) + len(container.streams.audio)
            if container.duration is None or len(self.decoders) < n_av:
                return
            end = (container.start_time or 0) / av.time_base + container.duration / av.time_base
            ends = [("media", end)]
        for kind, declared in ends:
            reached = self._ends.get(kind, self._last_end) if kind != "media" else self._last_end
            reached = reached if reached is not None else 0.0
            if reached < declared - _TRUNCATION_TOLERANCE_S:
                raise self._error(
                    DecodeError, f"truncated: {kind} ends at {reached:.2f} s but the file declares {declared:.2f} s"
                )

    def tracks(self) -> dict[str, Iterator[Any]]:
        """One iterator per decoder kind, fed by a single pass over the container.

        Records of the other kinds wait in a queue until their iterator asks; a `SourceBreak`
        goes to every iterator; an error is raised by each iterator once its queue is drained.
        """
        return _Tee(iter(self), [d.kind for d in self.decoders]).iterators()


class _Tee:
    def __init__(self, records: Iterator[Any], kinds: list[str]) -> None:
        self._records = records
        self._queues: dict[str, deque] = {k: deque() for k in kinds}
        self._done = False
        self._error: BaseException | None = None

    def iterators(self) -> dict[str, Iterator[Any]]:
        return {k: self._iter(k) for k in self._queues}

    def _iter(self, kind: str) -> Iterator[Any]:
        queue = self._queues[kind]
        while True:
            while not queue:
                if self._error is not None:
                    raise self._error
                if self._done:
                    return
                try:
                    record = next(self._records)
                except StopIteration:
                    self._done = True
                    continue
                except BaseException as e:
                    self._error = e
                    raise
                if isinstance(record, SourceBreak):
                    for q in self._queues.values():
                        q.append(record)
                else:
                    self._queues[_kind_of(record)].append(record)
            yield queue.popleft()


def _kind_of(record: Any) -> str:
    return "video" if isinstance(record, VideoFrame) else "audio"


def _reason(e: BaseException) -> str:
    """FFmpeg's own words for an error, without PyAV's errno prefix and file name."""
    text = getattr(e, "strerror", None) or str(e)
    return str(text)


__all__ = ["MediaReader", "SourceBreak", "SourceSettings", "is_url"]
